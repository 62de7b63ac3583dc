"""train.strategy: TF_CONFIG parsing and chief choice (fast), and a real two-worker fine-tune on loopback (slow).

The slow test starts two `graftline fine-tune` processes, each in its own copy
of a small project (as on two machines) with its own TF_CONFIG task index, and
checks that both take part (2 replicas, the same figures), that only the chief
writes outputs, and that the non-chief leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import datasets, devices, multi_worker, records
from components.errors import GraftlineError
from conftest import BIN, FLOWERS, REPO, WEIGHTS_224, project_env, require_shared, write_untrained_head
from pipeline import params as params_mod

TWO = {"worker": ["localhost:2222", "localhost:2223"]}


def config(cluster: dict, task_type: str, index) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("cluster, task_type, index, chief", [
    (TWO, "worker", 0, True),  # no chief in the cluster: worker 0 is it
    (TWO, "worker", 1, False),
    ({"chief": ["a:1"], **TWO}, "chief", 0, True),
    ({"chief": ["a:1"], **TWO}, "worker", 0, False),  # a named chief takes the role from worker 0
    ({"worker": ["a:1"]}, "worker", 0, True),
])
def test_tf_config_names_the_chief(cluster, task_type, index, chief):
    parsed = multi_worker.tf_config(config(cluster, task_type, index))
    assert parsed["task"] == {"type": task_type, "index": index}
    assert multi_worker.is_chief(parsed) is chief
    assert multi_worker.worker_count(parsed) == sum(len(v) for v in cluster.values())


def test_an_evaluator_is_not_counted_as_a_worker():
    parsed = multi_worker.tf_config(config({**TWO, "evaluator": ["e:1"]}, "worker", 1))
    assert multi_worker.worker_count(parsed) == 2 and not multi_worker.is_chief(parsed)


@pytest.mark.parametrize("text, why", [
    (None, "it is not set"),
    ("  ", "it is empty"),
    ("{cluster: 1}", "not JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    (json.dumps({"cluster": TWO}), '"task"'),
    (config(TWO, "worker", 2), "task index 2 is not 0..1"),
    (config(TWO, "worker", "0"), 'task index "0"'),
    (config(TWO, "chief", 0), "task type 'chief' is not in its cluster"),
    (config(TWO, "evaluator", 0), '"task"'),
    (config({"ps": ["p:1"], **TWO}, "worker", 0), "'ps' job"),
    (config({"worker": ["localhost"]}, "worker", 0), '"host:port"'),
    (config({"worker": []}, "worker", 0), '"host:port"'),
    (config({"chief": ["a:1", "b:2"], **TWO}, "worker", 0), "at most one"),
])
def test_missing_or_bad_tf_config_is_one_line_naming_the_key_and_what_to_set(text, why):
    with pytest.raises(GraftlineError) as info:
        multi_worker.tf_config(text)
    message = str(info.value)
    assert "train.strategy = 'multi_worker'" in message and "TF_CONFIG" in message and why in message
    assert '"cluster": {"worker": ["host1:port", "host2:port"]}' in message  # what to set
    assert "\n" not in message


def test_one_process_strategies_keep_their_outputs_and_report_one_worker():
    for setting, name in (("auto", "default (one device)"), ("one_device", "default (one device)"),
                          ("mirrored", "MirroredStrategy")):
        strategy = devices.strategy(setting)
        found = devices.placement(strategy, 8)
        assert found["strategy"] == name and found["replicas"] == 1 and found["devices"] == ["/device:CPU:0"]
        assert found["global_batch_size"] == 8 and "workers" not in found  # reports as before
        assert multi_worker.role(strategy) == {"workers": 1, "chief": True}
        outputs = {"metrics": Path("metrics/x.json")}
        with multi_worker.worker_outputs(strategy, outputs, "test") as written:
            assert written is outputs
        assert multi_worker.same_on_every_worker(strategy, 3)


def test_multi_worker_after_tensorflow_started_is_one_clear_line(monkeypatch):
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # this process has run TensorFlow (as every pytest process here has)
    # One worker: were the strategy made after all, it would not wait for peers.
    monkeypatch.setenv("TF_CONFIG", config({"worker": ["localhost:1"]}, "worker", 0))
    with pytest.raises(GraftlineError) as info:
        devices.strategy("multi_worker")
    message = str(info.value)
    assert "train.strategy = 'multi_worker'" in message and "own process" in message and "\n" not in message


@pytest.mark.parametrize("stage", ["train-head", "fine-tune"])
@pytest.mark.parametrize("tf_config, why", [(None, "it is not set"), ('{"cluster": ', "not JSON")])
def test_multi_worker_without_a_good_tf_config_fails_before_any_work(tmp_path, stage, tf_config, why):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"strategy": "multi_worker"}}))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    started = time.time()
    result = subprocess.run(["graftline", stage], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith(f"graftline {stage}: error:"))
    assert "train.strategy = 'multi_worker'" in line and "TF_CONFIG" in line and why in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no input was looked for
    assert time.time() - started < 60


# --- two real workers -------------------------------------------------------------------------------

WORKER_TIMEOUT_S = 300
PER_SPLIT = {"train": 8, "val": 4, "test": 4}  # shared flower photos, taken in turn from each class
BATCH_PER_REPLICA = 2  # x 2 workers: a global batch of 4, so 2 steps per epoch on the train split
CHIEF_OUTPUTS = ["metrics/fine_tune.json", "plots/fine_tune.csv", "plots/learning_curves.png",
                 "reports/fine_tune.json"]  # and artifacts/model/


def small_project(root: Path) -> None:
    """A fine-tune-ready folder without the session pipeline: a few shared flower photos as TFRecords, their
    labels and a head (untrained: what is tested is how two workers train and write, not the accuracy)."""
    import hashlib

    from components.atomic import write_json

    require_shared()
    classes = sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())
    photos = {c: iter(sorted((FLOWERS / c).iterdir())) for c in classes}
    examples = root / "artifacts" / "examples"
    examples.mkdir(parents=True)
    for split, n in PER_SPLIT.items():
        taken = []
        for i in range(n):
            label = i % len(classes)
            photo = next(photos[classes[label]])
            data = photo.read_bytes()
            taken.append(records.Record(f"{classes[label]}/{photo.name}", label, classes[label],
                                        hashlib.sha256(data).hexdigest(), data))
        records.write_shards(taken, examples, split, n, 100)
    write_json(root / "artifacts" / "labels.json", classes)
    write_untrained_head(root / "artifacts" / "head", classes)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"].update(model="mobilenet_v2", image_size=96, weights=str(WEIGHTS_224))  # the head takes pooled features: any size
    params["fine_tune_at"] = 100
    params["fine_tune"].update(epochs=1, batch_size=BATCH_PER_REPLICA, early_stopping_patience=0)
    params["export"]["tflite"] = []  # TFLite is checked in test_pipeline_e2e
    params["train"]["strategy"] = "multi_worker"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    params_mod.load(root / "params.yaml")  # valid before two processes are spent on it


def run_workers(roots: list[Path], env: dict, logs: Path) -> list[tuple[int, str]]:
    """One `graftline fine-tune` per folder, each with its TF_CONFIG task; (exit code, output) of each.

    A worker that hangs (a collective waiting for a peer) fails the test after
    WORKER_TIMEOUT_S. Both are killed with SIGKILL: TensorFlow's multi-worker
    runtime catches SIGTERM (its preemption notifier) and keeps running.
    """
    import portpicker

    cluster = {"worker": [f"localhost:{portpicker.pick_unused_port()}" for _ in roots]}
    procs, handles = [], []
    try:
        for index, root in enumerate(roots):
            scratch = logs / f"tmp{index}"  # the worker's TMPDIR: where a non-chief keeps its copies
            scratch.mkdir()
            handles.append(open(logs / f"worker{index}.log", "w"))
            procs.append(subprocess.Popen(
                ["graftline", "fine-tune"], cwd=root, stdout=handles[-1], stderr=subprocess.STDOUT,
                env={**env, "TF_CONFIG": config(cluster, "worker", index), "TMPDIR": str(scratch)}))
        deadline = time.time() + WORKER_TIMEOUT_S
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [i for i, proc in enumerate(procs) if proc.poll() is None]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for handle in handles:
            handle.close()
    results = [(proc.returncode, (logs / f"worker{i}.log").read_text()) for i, proc in enumerate(procs)]
    assert not hung, (f"workers {hung} still running after {WORKER_TIMEOUT_S} s, killed; logs:\n"
                      + "\n".join(f"--- worker {i}\n{text[-3000:]}" for i, (_, text) in enumerate(results)))
    return results


def done_line(output: str) -> dict:
    line = next(l for l in output.splitlines() if l.startswith("graftline fine-tune: done "))
    return json.loads(line[len("graftline fine-tune: done "):])


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_two_workers_fine_tune_and_only_the_chief_writes(tmp_path):
    # One folder per worker, as on two machines; each holds the same inputs.
    roots = [tmp_path / "worker0", tmp_path / "worker1"]
    small_project(roots[0])
    shutil.copytree(roots[0], roots[1])
    inputs = files_under(roots[0])
    logs = tmp_path / "logs"
    logs.mkdir()

    started = time.time()
    results = run_workers(roots, project_env(tmp_path / "keras-home"), logs)
    elapsed = time.time() - started
    for index, (code, output) in enumerate(results):
        assert code == 0, f"worker {index} exited {code}:\n{output[-6000:]}"
        done = done_line(output)  # both joined: each trained as one of 2 replicas
        assert done["strategy"] == "MultiWorkerMirroredStrategy" and done["replicas"] == 2, done
        assert done["epochs_run"] == 1
    assert "worker:0, one of 2 workers, the chief" in results[0][1]
    assert "worker:1, one of 2 workers, not the chief" in results[1][1]
    # Each says which it is; synchronous training: both end with the same figures.
    roles = [done_line(output) for _, output in results]
    assert [(r["task"], r["chief"], r["workers"]) for r in roles] == [("worker:0", True, 2), ("worker:1", False, 2)]
    same = [{k: v for k, v in r.items() if k not in ("wall_time_s", "task", "chief")} for r in roles]
    assert same[0] == same[1]

    report = json.loads((roots[0] / "reports" / "fine_tune.json").read_text())
    assert {k: report[k] for k in ("strategy", "workers", "task", "chief", "replicas", "batch_size_per_replica",
                                   "global_batch_size", "batch_sizes")} == {
        "strategy": "MultiWorkerMirroredStrategy", "workers": 2, "task": "worker:0", "chief": True, "replicas": 2,
        "batch_size_per_replica": BATCH_PER_REPLICA, "global_batch_size": 2 * BATCH_PER_REPLICA,
        "batch_sizes": {"train": 2 * BATCH_PER_REPLICA, "val": 2 * BATCH_PER_REPLICA}}

    # Only the chief wrote outputs (one metrics file in all), and nobody left temporary files behind.
    # Each worker caches the activations it computed (bottleneck.cache_dir: a cache, not an output).
    cached = [[p for p in files_under(root) - inputs if p.startswith("data/feature_cache/")] for root in roots]
    assert all(cached) and all(p.endswith(".f16") for c in cached for p in c)
    written = [sorted(files_under(root) - inputs - set(c)) for root, c in zip(roots, cached)]
    assert [p for p in written[0] if not p.startswith(("artifacts/model/", "dvclive/", "logs/"))] == CHIEF_OUTPUTS
    assert "artifacts/model/model.keras" in written[0]
    # and the epoch logs (DVCLive's, TensorBoard's): the chief's only
    assert "dvclive/fine_tune/metrics.json" in written[0]
    assert any(p.startswith("logs/fine_tune/") and "tfevents" in p for p in written[0])
    assert written[1] == [], "the non-chief wrote into its project folder"
    assert not (roots[0] / "data" / "checkpoints" / "fine_tune").exists()
    for index in range(2):  # the non-chief removed its copies; the chief never made any
        assert not list((logs / f"tmp{index}").glob("graftline-worker-*")), f"worker {index} left its copies"
    metrics = json.loads((roots[0] / "metrics" / "fine_tune.json").read_text())
    assert metrics["epochs_run"] == 1 and 0.0 <= metrics["val_accuracy"] <= 1.0

    # The chief's model loads with Keras (components.images registers its layers) and predicts the test photos.
    import keras

    labels = json.loads((roots[0] / "artifacts" / "labels.json").read_text())
    model = keras.saving.load_model(roots[0] / "artifacts" / "model" / "model.keras")
    photos = np.concatenate([x.numpy() for x, _ in datasets.image_dataset(roots[0] / "artifacts" / "examples",
                                                                            "test", 96, PER_SPLIT["test"])])
    probs = np.asarray(model.predict(photos, verbose=0))
    assert probs.shape == (PER_SPLIT["test"], len(labels))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    print(f"two-worker fine-tune: {elapsed:.1f} s")


def test_tfx_run_refuses_multi_worker(tmp_path):
    """LocalDagRunner runs every stage in one process: it cannot be one of several training workers."""
    from pipeline import tfx_pipeline

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["strategy"] = "multi_worker"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(GraftlineError, match="not for tfx-run"):
        tfx_pipeline.run_local(str(tmp_path / "params.yaml"), tmp_path / "tfx")
    assert not (tmp_path / "tfx").exists()
