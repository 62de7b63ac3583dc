"""fine-tune checkpoints every epoch: a run killed mid-way resumes from its last complete epoch, to the same
curve, best epoch and metrics as a run that was never killed: one base from its input up, and two bases side by
side from layer 100 (each base's activations at its own cut)."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from drawing import make_class_tree

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def graftline(stage: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["graftline", stage], cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# Early stopping's state is resumed too (patience 2), here with two bases, each cut at its own layer.
@pytest.mark.parametrize("patience, model, fine_tune_at", [(0, "mobilenet_v2", 0),
                                                         (2, "efficientnet_lite0+mobilenet_v2", 100)])
def test_killed_fine_tune_resumes_from_its_last_complete_epoch(tmp_path, monkeypatch, patience, model, fine_tune_at):
    make_class_tree(tmp_path / "photos", {"cats": 40, "dogs": 40, "owls": 40}, size=(96, 96))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "fine_tune_at": fine_tune_at,
        "data": {"source": str(tmp_path / "photos"), "sha256": "", "val_percent": 20, "test_percent": 20},
        "base": {"model": model, "alpha": 0.35, "image_size": 96, "weights": "none"},
        "train_head": {"epochs": 3},
        # cosine: the resumed run must go on down the same curve, not restart it
        "fine_tune": {"epochs": 4, "learning_rate": 0.0001 if patience == 0 else 0.003, "schedule": "cosine",
                      "batch_size": 8, "early_stopping_patience": patience},
        "export": {"tflite": []},  # what is resumed is training; TFLite is checked in test_pipeline_e2e
    }))
    from pipeline.cli import run_stage

    monkeypatch.chdir(tmp_path)  # the stages before it in this process: only fine-tune's processes matter here
    for stage in ("ingest", "bottleneck", "train-head"):
        run_stage(stage, "params.yaml")

    checkpoints = tmp_path / "data/checkpoints/fine_tune"
    run = subprocess.Popen(["graftline", "fine-tune"], cwd=tmp_path, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(checkpoints.glob("epoch-*/state.json")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)  # as a pre-empted machine or an OOM kill would
    run.wait()
    saved = sorted(checkpoints.glob("epoch-*/state.json"))
    assert saved, "fine-tune finished or failed before its first checkpoint"
    done = json.loads(saved[-1].read_text())["epochs_done"]
    assert done >= 1 and done < 4, "killed too late to test resuming"
    assert not (tmp_path / "artifacts/model").exists()  # nothing half-exported

    resumed = graftline("fine-tune", tmp_path)
    assert f"resuming after epoch {done} of 4" in resumed.stdout
    head_epochs = json.loads((tmp_path / "metrics/train_head.json").read_text())["epochs_run"]
    with open(tmp_path / "plots/fine_tune.csv", newline="") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    run_epochs = json.loads((tmp_path / "metrics/fine_tune.json").read_text())["epochs_run"]
    assert epochs == list(range(head_epochs + 1, head_epochs + 1 + run_epochs))  # numbered after the head's
    assert run_epochs == 4 or patience  # early stopping may end it sooner
    report = json.loads((tmp_path / "reports/fine_tune.json").read_text())
    assert report["resumed_after_epoch"] == done and report["trained_from"] == "activations"
    assert [b["model"] for b in report["bases"]] == model.split("+") and all(b["trainable_layers"] for b in report["bases"])
    rate = 0.0001 if patience == 0 else 0.003
    cosine = [rate * 0.5 * (1 + math.cos(math.pi * (e + 0.5) / 4)) for e in range(run_epochs)]
    assert report["learning_rate"] == {"schedule": "cosine", "per_epoch": pytest.approx(cosine, rel=1e-6)}
    # the rates the optimizer trained at, as DVCLive logged them, before the kill and after it
    with open(tmp_path / "dvclive/fine_tune/plots/metrics/train/learning_rate.tsv", newline="") as handle:
        logged = {int(row["step"]): float(row["learning_rate"]) for row in csv.DictReader(handle, delimiter="\t")}
    assert sorted(logged) == list(range(run_epochs))  # every epoch, those before the kill included
    assert [logged[e] for e in sorted(logged)] == pytest.approx(cosine, rel=1e-5)
    assert (tmp_path / "artifacts/model/model.keras").is_file() and not checkpoints.exists()

    # The same run, never killed: the same curve, the same epoch kept, the same metrics, digit for digit.
    resumed_figures = figures(tmp_path)
    graftline("fine-tune", tmp_path)
    assert json.loads((tmp_path / "reports/fine_tune.json").read_text())["resumed_after_epoch"] == 0
    assert figures(tmp_path) == resumed_figures


def figures(root: Path) -> dict:
    return {name: (root / name).read_text() for name in ("metrics/fine_tune.json", "plots/fine_tune.csv",
                                                         "dvclive/fine_tune/metrics.json")}
