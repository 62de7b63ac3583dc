"""The digits transfer recipe end to end, offline: pretrain on 0-4, preset, the five stages, scratch control."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import copy_repo, project_env

pytestmark = pytest.mark.e2e


def graftline(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(["graftline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"graftline {' '.join(args)}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    return result.stdout


def test_digits_transfer_reaches_090_and_prints_the_scratch_control(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    copy_repo(project)
    env = project_env(tmp_path / "keras-home")  # nothing to download: the base is the pretrained CNN

    pretrain = json.loads(re.search(r"done (\{.*\})", graftline(["pretrain-digits"], project, env)).group(1))
    assert pretrain["held_out_accuracy_0_4"] >= 0.9
    assert sorted(p.name for p in (project / "data/digits/digits_5_9").iterdir()) == ["5", "6", "7", "8", "9"]
    graftline(["preset", "digits"], project, env)
    from pipeline.cli import run_stage

    monkeypatch.chdir(project)  # the five stages in this process (the CLI runs them in test_pipeline_e2e)
    for stage in ("ingest", "bottleneck", "train-head", "fine-tune", "evaluate"):
        run_stage(stage, "params.yaml")
    printed = graftline(["scratch"], project, env)

    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    scratch = json.loads((project / "metrics/scratch.json").read_text())
    assert json.loads((project / "artifacts/labels.json").read_text()) == ["5", "6", "7", "8", "9"]
    assert evaluate["accuracy"] >= 0.9  # the Keras example's transfer, on scikit-learn's digits
    assert scratch["transfer_accuracy"] == evaluate["accuracy"]
    head = json.loads((project / "metrics/train_head.json").read_text())
    fine = json.loads((project / "metrics/fine_tune.json").read_text())
    assert scratch["epochs"] == head["epochs_run"] + fine["epochs_run"]  # the same epoch budget as head + fine-tune
    assert 0 <= scratch["scratch_accuracy"] <= 1
    assert f"test accuracy {evaluate['accuracy']:.3f} transferred vs {scratch['scratch_accuracy']:.3f} from scratch" in printed
    report = json.loads((project / "reports/bottleneck.json").read_text())
    assert report["base"]["model"] == "keras:data/digits/cnn_0_4.keras" and report["feature_width"] == 128
