"""End to end: the real five-stage `dvc repro` on ../shared/data/flowers (one run per session).

Runs with the default params (MobileNetV2 alpha 1.0 at 160 px, ImageNet
weights from a temporary KERAS_HOME, 10 fine-tune epochs); see conftest.py.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from components import features, records
from conftest import FLOWERS, REPO, run

pytestmark = pytest.mark.e2e

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
PATIENCE = 2  # fine_tune.early_stopping_patience


def load(path: Path):
    return json.loads(path.read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def declared_outputs() -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def test_every_declared_output_exists(project):
    outputs = declared_outputs()
    assert {"artifacts/examples", "artifacts/bottlenecks", "artifacts/head", "artifacts/model",
            "metrics/evaluate.json", "plots/confusion.csv"} <= set(outputs)
    missing = [p for p in outputs if not (project.root / p).exists()]
    assert not missing, f"declared in dvc.yaml but not written: {missing}"
    for stage in ("ingest", "bottleneck", "train_head", "fine_tune", "evaluate"):
        assert f"Running stage '{stage}'" in project.repro_log


def test_ingest_counts_every_photo_and_ignores_root_files(project):
    report = load(project.first / "reports/ingest.json")
    assert load(project.first / "artifacts/labels.json") == CLASSES
    assert report["num_examples"] == 400 and report["skipped"] == [] and report["duplicates"] == []
    assert {name: sum(c.values()) for name, c in report["classes"].items()} == {c: 80 for c in CLASSES}
    assert sum(report["splits"].values()) == 400 and min(report["splits"].values()) > 0
    assert {i["path"] for i in report["ignored"]} == {"LICENSE.txt", "SHA256SUMS", "SOURCE.md"}


def read_records(examples_dir: Path, split: str) -> list[records.Record]:
    import tensorflow as tf

    paths = [str(p) for p in records.shard_paths(examples_dir, split)]
    return [records.from_example(r.numpy()) for r in tf.data.TFRecordDataset(paths, compression_type="GZIP")]


def test_tfrecords_hold_the_original_photos(project):
    report = load(project.first / "reports/ingest.json")
    published = dict(reversed(line.split()) for line in (FLOWERS / "SHA256SUMS").read_text().splitlines())
    keys = set()
    for split in records.SPLITS:
        recs = read_records(project.root / "artifacts/examples", split)
        assert len(recs) == report["splits"][split]
        assert [r.key for r in recs] == sorted(r.key for r in recs)
        for r in recs:
            assert hashlib.sha256(r.image).hexdigest() == r.sha256 == published[r.key]
            assert CLASSES[r.label] == r.label_name == r.key.split("/")[0]
        keys |= {r.key for r in recs}
    assert len(keys) == 400


def test_bottleneck_parquet_schema_and_rows(project):
    report = load(project.first / "reports/ingest.json")
    bottleneck = load(project.first / "reports/bottleneck.json")
    assert bottleneck["forward_passes"] == 400 and bottleneck["feature_width"] == 1280
    for split in records.SPLITS:
        paths = features.files(project.root / "artifacts/bottlenecks", split)
        assert paths, split
        assert pq.read_schema(paths[0]).equals(features.schema(1280), check_metadata=False)
        keys, labels, feats = features.read_split(project.root / "artifacts/bottlenecks", split)
        recs = read_records(project.root / "artifacts/examples", split)
        assert keys == [r.key for r in recs] and labels.tolist() == [r.label for r in recs]
        assert feats.shape == (report["splits"][split], 1280) and np.isfinite(feats).all()
        assert feats.std() > 0.1  # real features, not zeros or a constant


def test_head_converges_on_cached_features(project):
    metrics = load(project.first / "metrics/train_head.json")
    curve = read_csv(project.first / "plots/train_head.csv")
    assert metrics["val_accuracy"] >= 0.75
    assert len(curve) == metrics["epochs_run"] and [int(r["epoch"]) for r in curve] == list(range(1, len(curve) + 1))
    best = curve[metrics["best_epoch"] - 1]
    assert float(best["val_accuracy"]) == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert min(float(r["val_loss"]) for r in curve) == pytest.approx(metrics["val_loss"], abs=1e-6)


def test_fine_tune_curve_joins_the_head_curve(project):
    head = load(project.first / "metrics/train_head.json")
    metrics = load(project.first / "metrics/fine_tune.json")
    curve = read_csv(project.first / "plots/fine_tune.csv")
    assert metrics["epochs_run"] >= 1 and metrics["epochs_run"] <= metrics["epochs"] == 6
    first = head["epochs_run"] + 1
    assert [int(r["epoch"]) for r in curve] == list(range(first, first + metrics["epochs_run"]))
    assert metrics["fine_tune_at"] == 100
    assert metrics["trainable_base_layers"] == 155 - 100 and metrics["frozen_batchnorm_layers"] == 18
    # Early stopping keeps the best val-loss epoch: the metrics are that row's, unless no epoch beat base +
    # head as train-head left them (then those are kept and best_epoch is null).
    best = min(curve, key=lambda r: float(r["val_loss"]))
    if metrics["best_epoch"] is None:
        assert float(best["val_loss"]) >= metrics["val_loss"]
        return
    assert int(best["epoch"]) == metrics["best_epoch"]
    assert float(best["val_accuracy"]) == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    if metrics["epochs_run"] < metrics["epochs"]:  # stopped: no improvement in the last `patience` epochs
        assert metrics["epochs_run"] - (metrics["best_epoch"] - head["epochs_run"]) == PATIENCE


def test_test_accuracy_and_confusion_matrix(project):
    metrics = load(project.first / "metrics/evaluate.json")
    rows = read_csv(project.first / "plots/confusion.csv")
    assert metrics["accuracy"] >= 0.75
    assert len(rows) == metrics["num_test"] == load(project.first / "reports/ingest.json")["splits"]["test"]
    assert np.mean([r["actual"] == r["predicted"] for r in rows]) == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["num_test"]
    # scikit-learn's figures equal what the confusion rows give by hand (the code before it used this formula)
    for name, scores in metrics["per_class"].items():
        tp = sum(r["actual"] == name == r["predicted"] for r in rows)
        predicted_n = sum(r["predicted"] == name for r in rows)
        precision, recall = (tp / predicted_n if predicted_n else 0.0), tp / scores["support"]
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((precision, recall, f1), abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx(np.mean([s["f1"] for s in metrics["per_class"].values()]), abs=1e-6)


def test_training_stages_log_for_tensorboard_and_dvclive(project):
    for stage in ("train_head", "fine_tune"):
        assert list((project.root / "logs" / stage).rglob("events.out.tfevents.*")), f"no TensorBoard log for {stage}"
        live = json.loads((project.root / "dvclive" / stage / "metrics.json").read_text())
        ours = load(project.first / f"metrics/{stage}.json")
        # DVCLive's Keras layout: train/ and eval/ (Keras' val_) figures of the last epoch, step counted from 0
        assert set(live) == {"train", "eval", "step"} and set(live["eval"]) == {"loss", "accuracy"}, live
        assert live["step"] == ours["epochs_run"] - 1  # no timings: deterministic, like every metrics file
        rows = (project.root / "dvclive" / stage / "plots" / "metrics" / "eval" / "loss.tsv").read_text().strip()
        assert len(rows.splitlines()) - 1 == ours["epochs_run"]


def test_saved_model_serves_encoded_bytes_like_evaluate(project):
    """The exported signature (bytes in) predicts what evaluate predicted: no training/serving skew."""
    import tensorflow as tf

    model_dir = project.root / "artifacts/model"
    if not (project.root / "plots/confusion.csv").exists():
        pytest.fail("workspace confusion.csv missing")
    served = tf.saved_model.load(str(model_dir / "saved_model"))
    recs = read_records(project.root / "artifacts/examples", "test")
    out = served.serve(tf.constant([r.image for r in recs]))
    names = [n.decode() for n in out["class_name"].numpy()]
    assert names == [r["predicted"] for r in read_csv(project.root / "plots/confusion.csv")]
    assert np.allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    assert json.loads((model_dir / "labels.json").read_text()) == CLASSES


def test_export_round_trip_keras_saved_model_tflite(project):
    """The same test photos through model.keras, the SavedModel (bytes in) and both TFLite files."""
    import keras
    import tensorflow as tf

    import components.images as images
    from components import export

    model_dir = project.root / "artifacts/model"
    recs = read_records(project.root / "artifacts/examples", "test")[:24]
    pixels = np.stack([images.decode_and_resize(tf.constant(r.image), 160).numpy() for r in recs])
    model = keras.saving.load_model(model_dir / "model.keras")
    keras_p = model(pixels, training=False).numpy()
    # Each weight stored once (Keras' ExportArchive.track would store every one twice: keras-team/keras#23553).
    stored = tf.train.list_variables(str(model_dir / "saved_model/variables/variables"))
    values = sum(int(np.prod(shape)) for name, shape in stored if name != "_CHECKPOINTABLE_OBJECT_GRAPH")
    assert values == sum(int(np.prod(w.shape)) for w in model.weights)
    loaded = tf.saved_model.load(str(model_dir / "saved_model"))  # keep it alive while serve runs
    served = loaded.serve(tf.constant([r.image for r in recs]))
    np.testing.assert_allclose(served["probabilities"].numpy(), keras_p, atol=1e-5)
    # decoded images in: what the TFLite files are converted from
    np.testing.assert_allclose(loaded.serve_images(tf.constant(pixels)).numpy(), keras_p, atol=1e-5)
    float_p = export.tflite_predict((model_dir / "model.tflite").read_bytes(), pixels)
    np.testing.assert_allclose(float_p, keras_p, atol=1e-4)
    quantized = export.tflite_predict((model_dir / "model_dynamic_range.tflite").read_bytes(), pixels)
    assert np.mean(quantized.argmax(1) == keras_p.argmax(1)) >= 0.9
    assert (model_dir / "labels.txt").read_text().split() == CLASSES
    metrics = load(project.first / "metrics/fine_tune.json")
    assert metrics["tflite_float_top1_agreement"] == 1.0
    assert metrics["tflite_dynamic_range_top1_agreement"] >= 0.9
    from components.stages.fine_tune import TFLITE_CHECK_MAX

    checked = load(project.first / "reports/fine_tune.json")["tflite"]
    assert {entry["checked_photos"] for entry in checked.values()} == {min(60, TFLITE_CHECK_MAX)}
    assert (project.first / "plots/learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (project.first / "plots/confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_cli_agrees_with_evaluate(project):
    """`graftline predict` on the test photos' files gives evaluate's predictions, top-k sorted."""
    recs = read_records(project.root / "artifacts/examples", "test")
    paths = [str(FLOWERS / r.key) for r in recs] + [str(FLOWERS / "LICENSE.txt")]
    out = subprocess.run(["graftline", "predict", "--json", "--top-k", "2", *paths], cwd=project.root,
                         env=project.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    assert results[-1] == {"path": str(FLOWERS / "LICENSE.txt"), "skipped": "not an image"}
    top = [r["top"] for r in results[:-1]]
    assert [t[0]["class"] for t in top] == [r["predicted"] for r in read_csv(project.root / "plots/confusion.csv")]
    assert all(len(t) == 2 and t[0]["probability"] >= t[1]["probability"] for t in top)


def test_evaluate_lists_top_k_and_confident_mistakes(project):
    metrics = load(project.first / "metrics/evaluate.json")
    mistakes = load(project.first / "reports/evaluate.json")["mistakes"]
    rows = read_csv(project.first / "plots/confusion.csv")
    assert metrics["accuracy"] <= metrics["top_3_accuracy"] <= 1.0
    wrong = sum(r["actual"] != r["predicted"] for r in rows)
    assert len(mistakes) == min(20, wrong)
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    for m in mistakes:
        assert m["actual"] != m["predicted"] and m["path"].split("/")[0] == m["actual"]
        assert (FLOWERS / m["path"]).is_file()


def test_evaluate_on_litert_scores_the_model_as_tensorflow_does(project, tmp_path):
    """evaluate.engine: litert scores the same model: the same predictions, its loss and the confidences of its
    mistakes within float32 rounding of TensorFlow's (the default engine, which scored the project)."""
    for rel in ("artifacts/examples", "artifacts/model"):
        shutil.copytree(project.root / rel, tmp_path / rel)
    params = yaml.safe_load((project.first / "params.yaml").read_text())
    params["evaluate"]["engine"] = "litert"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run(["graftline", "evaluate"], tmp_path, project.env, tmp_path / "evaluate.log", timeout=600)

    report = load(tmp_path / "reports/evaluate.json")
    assert report["engine"]["ran"] == "litert" and report["engine"]["conversion_s"] > 0
    assert load(project.first / "reports/evaluate.json")["engine"] == {"setting": "tensorflow", "ran": "tensorflow"}
    ours, reference = load(tmp_path / "metrics/evaluate.json"), load(project.first / "metrics/evaluate.json")
    assert read_csv(tmp_path / "plots/confusion.csv") == read_csv(project.first / "plots/confusion.csv")
    assert ours["accuracy"] == reference["accuracy"] and ours["per_class"] == reference["per_class"]
    assert ours["loss"] == pytest.approx(reference["loss"], abs=1e-4)
    mistakes = load(project.first / "reports/evaluate.json")["mistakes"]
    assert [m["path"] for m in report["mistakes"]] == [m["path"] for m in mistakes]
    np.testing.assert_allclose([m["confidence"] for m in report["mistakes"]], [m["confidence"] for m in mistakes],
                               atol=1e-4)


def test_fine_tune_zero_epochs_exports_base_and_head_unchanged(project, tmp_path):
    """fine_tune.epochs: 0 -> the model is base + head as trained; its val accuracy is the head's."""
    import keras

    for rel in ("artifacts/examples", "artifacts/head", "artifacts/labels.json"):
        src = project.root / rel
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / rel)
    params = yaml.safe_load((project.first / "params.yaml").read_text())
    params["fine_tune"]["epochs"] = 0
    params["export"]["tflite"] = []  # TFLite is checked in test_export_round_trip_keras_saved_model_tflite
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run(["graftline", "fine-tune"], tmp_path, project.env, tmp_path / "fine-tune.log", timeout=600)

    import components.images  # noqa: F401  (registers the preprocessing layer)

    model = keras.saving.load_model(tmp_path / "artifacts/model/model.keras")
    head = keras.saving.load_model(project.root / "artifacts/head/head.keras")
    # the exported model averages over the photo and its mirror (augment.tta: flip) around the classifier
    dense = model.get_layer("classifier").get_layer("head").get_layer("head_dense").get_weights()
    for got, want in zip(dense, head.get_layer("head_dense").get_weights()):
        np.testing.assert_array_equal(got, want)
    metrics = load(tmp_path / "metrics/fine_tune.json")
    head_metrics = load(project.first / "metrics/train_head.json")
    # Same photos, same base, same head: the cached-feature path and the image path agree.
    assert metrics["val_accuracy"] == pytest.approx(head_metrics["val_accuracy"], abs=1e-6)
    assert metrics["val_loss"] == pytest.approx(head_metrics["val_loss"], abs=1e-4)
    assert read_csv(tmp_path / "plots/fine_tune.csv") == []


def test_dvc_status_is_clean_after_repro(project):
    out = subprocess.run(["dvc", "status"], cwd=project.root, env=project.env, capture_output=True, text=True)
    assert out.returncode == 0 and "up to date" in out.stdout, out.stdout + out.stderr
