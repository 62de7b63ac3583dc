"""A sweep over fine_tune_at through DVC's experiment queue, on a copy of the session's finished pipeline.

Each queued run is `dvc exp run -S fine_tune_at=N` run by DVC's queue worker: the same command a user
types in the workspace, so this is also the test that such an experiment re-runs only fine_tune and
evaluate.
"""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from conftest import run
from test_ci_evaluate import copy_project

pytestmark = pytest.mark.e2e

SWEEP = (110, 130)  # fine_tune_at values; MobileNetV2 has 155 layers
DEADLINE_S = 240


def queue_status(root, env) -> str:
    return subprocess.run(["dvc", "queue", "status"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60).stdout


def experiments(shown: list, names: set[str]) -> dict[str, dict]:
    """name -> data of each named experiment in `dvc exp show --json` (found wherever DVC nests them)."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") in names and isinstance(node.get("data"), dict) and "metrics" in node["data"]:
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


def test_queued_sweep_over_fine_tune_at(project, tmp_path):
    root = copy_project(project, tmp_path / "project")
    env, log = project.env, tmp_path / "queue.log"
    names = {f"ft-{at}" for at in SWEEP}
    for at in SWEEP:
        run(["dvc", "exp", "run", "--queue", "-n", f"ft-{at}", "-S", f"fine_tune_at={at}", "-S", "fine_tune.epochs=1",
             "-S", "export.tflite=[]"],  # TFLite is checked in test_pipeline_e2e; seconds saved per run
            root, env, log)
    assert len(re.findall(r"\bQueued\b", queue_status(root, env))) == 2
    run(["dvc", "queue", "start", "-j", "2"], root, env, log)
    try:
        deadline = time.time() + DEADLINE_S
        while re.search(r"\b(Queued|Running)\b", status := queue_status(root, env)):
            assert time.time() < deadline, f"queue not done after {DEADLINE_S} s:\n{status}"
            time.sleep(3)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, capture_output=True, timeout=120)
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status
    for name in sorted(names):
        logged = run(["dvc", "queue", "logs", name], root, env, log)
        ran = set(re.findall(r"Running stage '(\w+)'", logged))
        skipped = set(re.findall(r"Stage '(\w+)' didn't change, skipping", logged))
        assert ran == {"fine_tune", "evaluate"}, logged
        assert {"ingest", "bottleneck", "train_head"} <= skipped, logged

    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env, log))
    found = experiments(shown, names)
    assert set(found) == names, json.dumps(shown)[:3000]
    head = json.loads((project.first / "metrics/train_head.json").read_text())
    test_photos = json.loads((project.first / "reports/ingest.json").read_text())["splits"]["test"]
    for at in SWEEP:
        data = found[f"ft-{at}"]
        assert data["params"]["params.yaml"]["data"]["fine_tune_at"] == at
        fine_tune = data["metrics"]["metrics/fine_tune.json"]["data"]
        # DVCLive's files too: what `dvc exp show` lists for a running experiment
        live = data["metrics"]["dvclive/fine_tune/metrics.json"]["data"]
        assert live["step"] == fine_tune["epochs_run"] - 1 and "loss" in live["eval"]
        assert "dvclive/train_head/metrics.json" in data["metrics"]
        assert fine_tune["fine_tune_at"] == at and fine_tune["epochs"] == 1
        assert fine_tune["trainable_base_layers"] == 155 - at
        evaluate = data["metrics"]["metrics/evaluate.json"]["data"]
        assert 0 < evaluate["accuracy"] <= 1 and evaluate["num_test"] == test_photos
        # Only fine_tune and evaluate re-ran: the head's figures are the first run's.
        assert data["metrics"]["metrics/train_head.json"]["data"] == head
    # Two different trainings, not one result listed twice.
    assert found["ft-110"]["metrics"]["metrics/fine_tune.json"]["data"] != \
        found["ft-130"]["metrics"]["metrics/fine_tune.json"]["data"]
