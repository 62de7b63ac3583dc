"""`make ci-evaluate` (what evaluate.yml runs on every pull request) on a copy of the session's finished pipeline.

The copy (workspace, .git with main's first-run commit, .dvc/cache) is reset
to that commit, so the session's own workspace, which other tests read, is
never touched.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import Project, run

pytestmark = pytest.mark.e2e


def copy_project(project: Project, dest: Path) -> Path:
    """Copy the finished pipeline and reset it to the committed first run (an experiment may have changed it)."""
    dvc_dir = project.root / ".dvc"
    # .dvc/tmp holds locks and queue state of the original; the copy makes its own.
    shutil.copytree(project.root, dest, symlinks=True,
                    ignore=lambda folder, names: {"tmp"} if Path(folder) == dvc_dir else set())
    log = dest.parent / "reset.log"
    run(["git", "checkout", "--", "."], dest, project.env, log)
    run(["dvc", "checkout", "--force"], dest, project.env, log)
    return dest


def ci_evaluate(root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "ci-evaluate"], cwd=root, env=env, capture_output=True, text=True, timeout=900)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def load(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ci(project, tmp_path_factory) -> Path:
    return copy_project(project, tmp_path_factory.mktemp("ci") / "project")


def test_ci_evaluate_reruns_only_evaluation_and_gets_the_first_runs_figures(ci, project):
    # A stale figure in the workspace must not survive: the evaluation has to write its own.
    (ci / "metrics/evaluate.json").write_text(json.dumps({"accuracy": 0.0}))
    (ci / "plots/confusion.csv").unlink()
    result = ci_evaluate(ci, project.env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert ran_stages(output) == ["evaluate"], output[-6000:]
    assert load(ci / "metrics/evaluate.json") == load(project.first / "metrics/evaluate.json")
    assert (ci / "plots/confusion.csv").read_text() == (project.first / "plots/confusion.csv").read_text()
    # The training stages' figures, moved aside during the run, are back as they were.
    for rel in ("metrics/train_head.json", "metrics/fine_tune.json", "plots/train_head.csv", "plots/fine_tune.csv"):
        assert (ci / rel).read_bytes() == (project.first / rel).read_bytes(), rel
    accuracy = load(project.first / "metrics/evaluate.json")["accuracy"]
    assert f"graftline gate: passed: accuracy = {accuracy}; baseline {accuracy}, evaluate.max_drop = 0.02" in output
    # The evaluation page is the first run's, curves included (fine-tune's PNG stays in place).
    assert (ci / "reports/evaluate.html").read_bytes() == (project.first / "reports/evaluate.html").read_bytes()
    # Nothing else changed: only the report (its wall time) and, in dvc.lock, that report's hash.
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=ci, capture_output=True, text=True).stdout
    assert set(changed.split()) <= {"M", "dvc.lock", "reports/evaluate.json"}, changed
    committed = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=ci, capture_output=True, text=True).stdout
    assert without_report(yaml.safe_load(committed)) == without_report(yaml.safe_load((ci / "dvc.lock").read_text()))


def without_report(lock: dict) -> dict:
    """dvc.lock without the entry of reports/evaluate.json, whose wall time differs every run."""
    outs = lock["stages"]["evaluate"]["outs"]
    lock["stages"]["evaluate"]["outs"] = [o for o in outs if o["path"] != "reports/evaluate.json"]
    assert len(lock["stages"]["evaluate"]["outs"]) == len(outs) - 1
    return lock


def shuffle_head(model_file: Path, seed: int = 0) -> None:
    """Make the model worse on purpose: shuffle its head's Dense weights with a fixed seed."""
    import keras

    import components.images  # noqa: F401  (registers the preprocessing layer)

    model = keras.saving.load_model(model_file)
    dense = model.get_layer("classifier").get_layer("head").get_layer("head_dense")  # inside the flip average
    rng = np.random.default_rng(seed)
    dense.set_weights([rng.permutation(w.ravel()).reshape(w.shape) for w in dense.get_weights()])
    model_file.unlink()  # a new file, never written through a link into DVC's cache
    model.save(model_file)


def test_a_worse_model_fails_the_gate(ci, project):
    first = load(project.first / "metrics/evaluate.json")
    shuffle_head(ci / "artifacts/model/model.keras")

    # Not what dvc.lock records: refused before any evaluation (a PR must carry a model DVC knows).
    result = ci_evaluate(ci, project.env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ci-evaluate: the training outputs are missing or stale" in output, output
    assert ran_stages(output) == []

    # Recorded as fine_tune's output (what a pull request with a worse trained model looks like).
    run(["dvc", "commit", "--force", "fine_tune"], ci, project.env, ci.parent / "commit.log")
    result = ci_evaluate(ci, project.env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    assert ran_stages(output) == ["evaluate"]
    worse = load(ci / "metrics/evaluate.json")["accuracy"]
    assert worse < first["accuracy"] - 0.02
    drop = round(first["accuracy"] - worse, 6)
    assert (f"graftline gate: failed: accuracy = {worse} dropped {drop} below the baseline {first['accuracy']}, "
            "more than evaluate.max_drop = 0.02") in output, output[-3000:]

    # With a threshold, the evaluate stage itself fails, naming metric, value and threshold.
    params = yaml.safe_load((ci / "params.yaml").read_text())
    params["evaluate"]["thresholds"] = {"accuracy": 0.5}
    (ci / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = ci_evaluate(ci, project.env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    line = f"graftline evaluate: error: accuracy = {worse} is below its threshold 0.5 (evaluate.thresholds.accuracy)"
    assert line in output.splitlines(), output[-3000:]
    assert "graftline gate" not in output  # make stopped at the failed stage
