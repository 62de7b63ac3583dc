"""train.device / train.mixed_precision: the pure choices, the one-line errors, and what the reports say.

No GPU here, so the GPU branches are tested as the pure functions that decide
them, and the multi-replica path runs for real on two logical CPUs (a
subprocess, since device setup is process-wide and must come first).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from components import devices
from components.stages import train_head
from components import head as head_lib
from components.errors import GraftlineError
from conftest import REPO
from pipeline import params as params_mod
from pipeline import runtime, stages
from test_cli import assert_one_line_error, graftline, write_params
from test_train_head import LABELS, make_bottlenecks


@pytest.mark.parametrize("setting, gpus, expected", [
    ("auto", 0, "cpu"), ("auto", 2, "gpu"), ("cpu", 0, "cpu"), ("cpu", 4, "cpu"), ("gpu", 1, "gpu"),
])
def test_choose_device(setting, gpus, expected):
    assert devices.choose_device(setting, gpus) == expected


def test_gpu_without_a_gpu_is_an_error_that_names_the_key():
    with pytest.raises(GraftlineError) as info:
        devices.choose_device("gpu", 0)
    message = str(info.value)
    assert "train.device = 'gpu'" in message and "no GPU" in message and "auto" in message
    assert "\n" not in message


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "gpu", "mixed_float16"), ("auto", "cpu", "float32"),
    ("on", "cpu", "mixed_float16"), ("on", "gpu", "mixed_float16"),
    ("off", "gpu", "float32"), ("off", "cpu", "float32"),
])
def test_choose_policy(setting, device, expected):
    assert devices.choose_policy(setting, device) == expected


def slices(batch: int, replicas: int, examples: int) -> list[list[int]]:
    """How MirroredStrategy cuts each batch: per-replica slices of batch/replicas, filled in order."""
    per, cuts = batch // replicas, []
    for start in range(0, examples, batch):
        size = min(batch, examples - start)
        cuts.append([max(0, min(per, size - i * per)) for i in range(replicas)])
    return cuts


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_batch_for_gives_every_replica_examples_and_a_full_first_batch(replicas):
    for examples in range(replicas, 200):
        try:
            size = devices.batch_for(16 * replicas, replicas, examples, "test split")
        except GraftlineError as exc:
            assert f"{examples} examples" in str(exc) and "train.device: cpu" in str(exc)
            continue
        cuts = slices(size, replicas, examples)
        assert size % replicas == 0 and size <= 16 * replicas
        assert len(set(cuts[0])) == 1, (examples, size, cuts[0])  # equal slices in the first batch
        assert all(min(c) > 0 for c in cuts), (examples, size, cuts[-1])


def test_batch_for_examples():
    assert devices.batch_for(32, 1, 5, "x") == 32  # one replica: unchanged, even past the data
    assert devices.batch_for(64, 2, 289, "x") == 64  # the flowers sample's train split on 2 GPUs
    assert devices.batch_for(64, 2, 51, "x") == 32  # its val split: 32 + 19, not 50 + 1
    with pytest.raises(GraftlineError, match="9 examples"):
        devices.batch_for(8, 2, 9, "fine-tune: train split")


def test_head_outputs_float32_under_mixed_precision():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = head_lib.build_head(8, 3, 0.2)
        out = head(np.ones((2, 8), np.float32))
        assert head.get_layer("head_dropout").compute_dtype == "float16"  # the policy did apply
        assert head.get_layer("head_dense").compute_dtype == "float32"
        assert out.dtype == "float32"
        np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, atol=1e-6)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("stage", ["train-head", "fine-tune"])
def test_gpu_stage_without_gpu_fails_before_any_work(tmp_path, stage):
    # No inputs at all: the device error must come before the stage looks for them.
    write_params(tmp_path, {"train": {"device": "gpu"}})
    result, elapsed = graftline([stage], tmp_path)
    assert_one_line_error(result, stage, "train.device = 'gpu'", "no GPU")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    assert elapsed < 60  # TensorFlow's import is most of it


def test_devices_command_is_a_preflight(tmp_path):
    write_params(tmp_path, {})
    result, _ = graftline(["devices", "--device", "gpu"], tmp_path)
    assert_one_line_error(result, "devices", "train.device = 'gpu'", "no GPU")
    result, _ = graftline(["devices", "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout.split("graftline devices: done ", 1)[1])
    assert done["device"] == "cpu" and done["devices"] == ["/device:CPU:0"] and done["replicas"] == 1
    assert done["mixed_precision"] == "float32"


def test_cpu_device_trains_and_reports_where(tmp_path):
    p = params_mod.from_dict({"seed": 7, "train": {"device": "cpu"},
                              "train_head": {"epochs": 30, "early_stopping_patience": 5, "learning_rate": 0.01,
                                             "batch_size": 16}})
    bottlenecks = make_bottlenecks(tmp_path / "bottlenecks", separable=True)
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    outputs = {"head": tmp_path / "head", "metrics": tmp_path / "metrics.json", "plots": tmp_path / "curve.csv",
               "report": tmp_path / "report.json"}
    runtime.configure_devices(stages.STAGES["train_head"], p)  # as both adapters do
    runtime.configure(p.seed)
    train_head.run(p, {"bottlenecks": bottlenecks, "labels": tmp_path / "labels.json"}, outputs)
    report = json.loads(outputs["report"].read_text())
    assert {k: report[k] for k in ("device", "devices", "strategy", "replicas", "mixed_precision",
                                   "batch_size_per_replica", "global_batch_size", "batch_sizes")} == {
        "device": "cpu", "devices": ["/device:CPU:0"], "strategy": "default (one device)", "replicas": 1,
        "mixed_precision": "float32", "batch_size_per_replica": 16, "global_batch_size": 16,
        "batch_sizes": {"train": 16, "val": 32}}  # val: Keras' default for arrays, as before
    metrics = json.loads(outputs["metrics"].read_text())
    assert metrics["val_accuracy"] >= 0.9
    assert not set(metrics) & set(report), "devices and timing must stay out of the metrics DVC compares"


# Two logical CPUs stand in for two GPUs: MirroredStrategy, the global batch and mixed precision
# run for real through train_head, fine_tune (export included) and evaluate.
TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np
    from components import export, records
    from components.stages import evaluate, fine_tune, train_head
    from conftest import write_untrained_head
    from drawing import encode, pixels
    from pipeline import params as params_mod, runtime, stages
    from test_train_head import LABELS, make_bottlenecks

    work = Path(sys.argv[1])
    p = params_mod.from_dict({
        "seed": 7, "fine_tune_at": 140,
        "train": {"device": "auto", "mixed_precision": "on"},
        "train_head": {"epochs": 20, "early_stopping_patience": 5, "learning_rate": 0.01, "batch_size": 16},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": 32, "weights": "none"},
        "fine_tune": {"epochs": 1, "batch_size": 4}, "export": {"tflite": []}})
    out = {}

    runtime.configure_devices(stages.STAGES["train_head"], p)
    runtime.configure(p.seed)
    (work / "labels.json").write_text(json.dumps(LABELS))
    head_out = {"head": work / "head", "metrics": work / "head.json", "plots": work / "head.csv",
                "report": work / "head-report.json"}
    train_head.run(p, {"bottlenecks": make_bottlenecks(work / "bottlenecks", separable=True),
                       "labels": work / "labels.json"}, head_out)
    out["head_report"] = json.loads(head_out["report"].read_text())
    out["head_metrics"] = json.loads(head_out["metrics"].read_text())

    # fine_tune: two classes of drawn photos, a head over MobileNetV2's 1280 features.
    names = ["red", "blue"]
    examples = work / "examples"
    examples.mkdir()
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        recs = [records.Record(f"{names[i % 2]}/{split}{i}.png", i % 2, names[i % 2], "0" * 64,
                               encode(pixels([(220, 40, 40), (40, 70, 210)][i % 2], 32, seed=i), "PNG"))
                for i in range(n)]
        records.write_shards(recs, examples, split, n, 100)
    (work / "labels2.json").write_text(json.dumps(names))
    head_dir = work / "head2"
    write_untrained_head(head_dir, names)
    runtime.configure_devices(stages.STAGES["fine_tune"], p)
    runtime.configure(p.seed)
    ft_out = {"model": work / "model", "metrics": work / "ft.json", "plots": work / "ft.csv",
              "curves": work / "curves.png", "report": work / "ft-report.json"}
    fine_tune.run(p, {"examples": examples, "labels": work / "labels2.json", "head": head_dir,
                      "checkpoints": work / "checkpoints"}, ft_out)
    out["fine_tune_report"] = json.loads(ft_out["report"].read_text())
    model = keras.saving.load_model(work / "model" / export.MODEL_FILE)
    out["model_output_dtype"] = str(model(np.zeros((1, 32, 32, 3), np.float32)).dtype.name)

    runtime.configure_devices(stages.STAGES["evaluate"], p, own_process=False)
    runtime.configure(p.seed)
    ev_out = {"metrics": work / "ev.json", "confusion": work / "confusion.csv",
              "confusion_png": work / "confusion.png", "report": work / "ev-report.json", "html": work / "ev.html"}
    out["evaluate"] = evaluate.run(p, {"examples": examples, "model": work / "model", "curves": work / "curves.png"},
                                   ev_out)
    out["policy_after_evaluate_setup"] = keras.mixed_precision.global_policy().name
    print("RESULT " + json.dumps(out, default=str))
""")


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("two-replicas")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run([sys.executable, "-c", TWO_REPLICAS, str(work)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.e2e
def test_several_devices_mirror_the_head_with_a_global_batch(two_replicas):
    report = two_replicas["head_report"]
    assert report["strategy"] == "MirroredStrategy" and report["replicas"] == 2
    assert report["devices"] == ["/device:CPU:0", "/device:CPU:1"] and report["device"] == "cpu"
    assert report["batch_size_per_replica"] == 16 and report["global_batch_size"] == 32
    assert report["batch_sizes"] == {"train": 32, "val": 60}  # 160 train photos; 60 val photos in one batch
    assert report["mixed_precision"] == "mixed_float16"
    # Mixed precision and two replicas still learn the separable clusters.
    assert two_replicas["head_metrics"]["val_accuracy"] >= 0.9


@pytest.mark.e2e
def test_several_devices_fine_tune_exports_a_float32_output(two_replicas):
    report = two_replicas["fine_tune_report"]
    assert report["strategy"] == "MirroredStrategy" and report["replicas"] == 2
    assert report["global_batch_size"] == 8 and report["mixed_precision"] == "mixed_float16"
    assert report["batch_sizes"] == {"train": 8, "val": 4}  # 4 val photos: one full batch, 2 per replica
    assert two_replicas["model_output_dtype"] == "float32"
    assert two_replicas["evaluate"]["num_test"] == 4
    # evaluate's setup puts the process-wide policy back to float32.
    assert two_replicas["policy_after_evaluate_setup"] == "float32"
