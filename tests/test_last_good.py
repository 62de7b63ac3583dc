"""A failed or killed run keeps the last good results: every stage's tracked outputs replace the last set
only when the stage completes (components.atomic.output_set; dvc.yaml marks them persist, so DVC does not
delete them first), and a fine-tune killed during its export resumes in one `dvc repro` to the model and
metrics that an uninterrupted run makes.

The first tests run output_set itself, killed for real (SIGKILL) in the middle of putting a set in place.
The others run real `dvc` in a temporary git repo on 36 shared flower photos (MobileNetV2 alpha 0.35 at 96 px).
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from components import atomic
from conftest import SHARED, require_shared, run, small_dvc_project

WEIGHTS_035 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
CLASSES = ("daisy", "roses", "tulips")
PER_CLASS = 12
OUTPUT_FOLDERS = ("artifacts", "metrics", "plots", "reports", "dvclive")


# ------------------------------------------------------------------ output_set on its own


def _old_set(root: Path) -> dict[str, Path]:
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.bin").write_text("old model")
    (root / "metrics.json").write_text('{"accuracy": 0.5}')
    (root / "curves.png").write_text("old curves")
    return {"model": root / "model", "metrics": root / "metrics.json", "curves": root / "curves.png"}


def _contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_error_leaves_the_last_set_and_no_temporary(tmp_path):
    finals = _old_set(tmp_path / "out")
    before = _contents(tmp_path / "out")
    with pytest.raises(ValueError), atomic.output_set(finals, tmp_path / "journal.json") as staged:
        (staged["model"]).mkdir()
        (staged["model"] / "weights.bin").write_text("new model")
        atomic.write_json(staged["metrics"], {"accuracy": 0.9})
        raise ValueError("the stage failed after writing two of its three outputs")
    assert _contents(tmp_path / "out") == before


def test_a_whole_set_replaces_the_last_and_an_output_not_made_is_removed(tmp_path):
    finals = _old_set(tmp_path / "out")
    with atomic.output_set(finals, tmp_path / "journal.json") as staged:
        assert all(p.name == finals[k].name for k, p in staged.items())  # writers that go by the suffix work
        staged["model"].mkdir()
        (staged["model"] / "weights.bin").write_text("new model")
        atomic.write_json(staged["metrics"], {"accuracy": 0.9})
    assert _contents(tmp_path / "out") == {"metrics.json": '{\n  "accuracy": 0.9\n}\n', "model/weights.bin": "new model"}
    assert not (tmp_path / "journal.json").exists()


KILLED_WHILE_REPLACING = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from components import atomic
root = Path({root!r})
finals = {{"model": root / "model", "metrics": root / "metrics.json", "curves": root / "curves.png"}}
replace = os.replace
def replace_then_die(src, dst):
    replace(src, dst)
    if Path(dst).name == "model":  # the first output is in place, the others are not: killed here
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
with atomic.output_set(finals, root.parent / "journal.json") as staged:
    staged["model"].mkdir()
    (staged["model"] / "weights.bin").write_text("new model")
    staged["metrics"].write_text("new metrics")
    staged["curves"].write_text("new curves")
"""


def test_a_run_killed_while_replacing_is_completed_by_the_next(tmp_path):
    finals = _old_set(tmp_path / "out")
    repo = str(Path(__file__).resolve().parents[1])
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_REPLACING.format(repo=repo, root=str(tmp_path / "out"))])
    assert killed.returncode == -signal.SIGKILL
    half = _contents(tmp_path / "out")
    assert half["model/weights.bin"] == "new model" and half["metrics.json"] == '{"accuracy": 0.5}'  # half-replaced
    with atomic.output_set(finals, tmp_path / "journal.json"):  # the next run completes it before its own work
        assert _contents(tmp_path / "out") == {"curves.png": "new curves", "metrics.json": "new metrics",
                                               "model/weights.bin": "new model"}
        raise_later = True
    assert raise_later and not (tmp_path / "journal.json").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------ a real DVC project


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(project root, env, log folder) after one good `dvc repro` of the whole pipeline."""
    require_shared()
    root, _, env, logs = small_dvc_project(
        tmp_path_factory.mktemp("last-good"), CLASSES, PER_CLASS, data={"val_percent": 25, "test_percent": 25},
        base={"alpha": 0.35, "image_size": 96, "weights": str(WEIGHTS_035)}, train_head={"epochs": 8},
        fine_tune={"epochs": 3}, export={"tflite": []})
    run(["dvc", "repro"], root, env, logs / "repro-1.log")
    run(["git", "add", "-A"], root, env, logs / "git.log")
    run(["git", "commit", "-qm", "first results"], root, env, logs / "git.log")
    return root, env, logs


def outputs(root: Path) -> dict[str, str]:
    """sha256 of every file the stages wrote, outside the temporaries a killed run leaves (see leftovers)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in OUTPUT_FOLDERS for p in sorted((root / folder).rglob("*"))
            if p.is_file() and ".tmp-" not in str(p.relative_to(root))}


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for folder in OUTPUT_FOLDERS + ("data",) for p in (root / folder).rglob("*")
            if ".tmp-" in p.name]


def dvc(args: list[str], root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=1200)


def changed(root: Path, env: dict) -> set[str]:
    return set(json.loads(dvc(["status", "--json"], root, env).stdout))


@pytest.mark.e2e
@pytest.mark.parametrize("setting", ["fine_tune_at=abc", "train_head.epochs=0"])
def test_a_failed_experiment_keeps_every_output_and_params_come_back_from_git(good, setting):
    root, env, _ = good
    before = outputs(root)
    failed = dvc(["exp", "run", "-S", setting], root, env)
    assert failed.returncode != 0
    assert "error: params:" in failed.stdout + failed.stderr  # the stage's one line, not DVC's
    assert outputs(root) == before  # DVC deleted nothing, the stage replaced nothing
    assert changed(root, env)  # dvc.lock still says the outputs are not this params.yaml's
    # what the README says to do: params.yaml back from git, and DVC sees the last good run again
    subprocess.run(["git", "checkout", "params.yaml"], cwd=root, env=env, check=True)
    assert changed(root, env) == set()
    assert not leftovers(root)


def fine_tune_process(dvc_run: subprocess.Popen) -> psutil.Process | None:
    """The stage's own process (`graftline fine_tune`). Without $SHELL, DVC starts it through `/bin/sh -c`, and
    dash does not exec: killing that shell would leave the stage running on behind the next `dvc repro`."""
    for child in psutil.Process(dvc_run.pid).children(recursive=True):
        try:
            if "fine_tune" in child.cmdline()[1:]:  # an argument of its own, not inside a shell's -c string
                return child
        except psutil.NoSuchProcess:
            pass
    return None


def stage_processes(root: Path) -> list[psutil.Process]:
    """Every live process running a stage in ``root``, wherever it was re-parented."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["cwd"] == str(root) and any(arg.endswith("graftline") for arg in cmdline[:2]):
            found.append(proc)
    return found


def figures(root: Path) -> dict:
    return {name: (root / name).read_text() for name in ("metrics/fine_tune.json", "metrics/evaluate.json",
                                                         "plots/fine_tune.csv", "dvclive/fine_tune/metrics.json")}


@pytest.mark.e2e
def test_a_fine_tune_killed_during_export_resumes_in_one_repro_to_the_uninterrupted_result(good):
    root, env, logs = good
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fine_tune"].update(learning_rate=0.0003)  # an experiment: fine_tune and evaluate re-run
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = outputs(root)

    dvc_run = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline, stage = time.time() + 600, None
    while dvc_run.poll() is None and time.time() < deadline:
        stage = stage or fine_tune_process(dvc_run)
        if stage and list((root / "artifacts").glob(".model.tmp-*/**/labels.json")):  # exporting
            stage.send_signal(signal.SIGKILL)  # as an OOM kill would
            break
        time.sleep(0.02)
    assert dvc_run.wait(timeout=300) != 0, "fine-tune finished before it was killed"
    assert not stage_processes(root)  # the stage itself died: nothing of it runs on behind the next repro
    assert outputs(root) == before  # the last good set, whole: nothing of the killed run
    assert leftovers(root)  # its half-made set, under temporary names the next run removes
    assert list((root / "data/checkpoints/fine_tune").glob("epoch-*/state.json"))  # what it leaves to resume

    resumed = run(["dvc", "repro"], root, env, logs / "repro-resumed.log")
    assert re.search(r"resuming after epoch 3 of 3", resumed)
    assert not leftovers(root) and not (root / "data/checkpoints/fine_tune").exists()
    after_kill = figures(root)
    assert json.loads((root / "reports/fine_tune.json").read_text())["resumed_after_epoch"] == 3

    run(["dvc", "repro", "--force", "--single-item", "fine_tune"], root, env, logs / "repro-through.log")
    run(["dvc", "repro"], root, env, logs / "repro-evaluate.log")
    assert json.loads((root / "reports/fine_tune.json").read_text())["resumed_after_epoch"] == 0
    assert figures(root) == after_kill  # same val-loss choice, best epoch, curve and test figures, digit for digit
