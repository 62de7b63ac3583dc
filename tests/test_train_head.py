"""components/stages/train_head.py (and features.py) on synthetic bottleneck features written as Parquet."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import features
from components.stages import train_head
from components import head as head_lib
from components import recipe
from components.errors import GraftlineError
from pipeline import params as params_mod
from pipeline import runtime

WIDTH = 24
LABELS = ["ants", "bees", "cats", "dogs"]


def write_split(folder: Path, split: str, keys, labels, feats, n_files: int = 1) -> list[Path]:
    """Rows -> ``{split}-{i:05d}-of-{n:05d}.parquet`` files with features.schema, rows spread round-robin."""
    folder.mkdir(parents=True, exist_ok=True)
    width = np.asarray(feats).shape[1]
    paths = []
    for i in range(n_files):
        rows = [(k, l, split, f) for j, (k, l, f) in enumerate(zip(keys, labels, feats)) if j % n_files == i]
        path = folder / f"{split}-{i:05d}-of-{n_files:05d}.parquet"
        pq.write_table(features.table(rows, width), path)
        paths.append(path)
    return paths


def clusters(n: int, seed: int, centers: np.ndarray, noise: float = 0.6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centers), n)
    feats = centers[labels] + rng.normal(0, noise, (n, centers.shape[1]))
    return labels, feats.astype(np.float32)


def make_bottlenecks(folder: Path, separable: bool, n_train: int = 160, n_val: int = 60) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3.0, (len(LABELS), WIDTH))
    if separable:
        y_train, x_train = clusters(n_train, 1, centers)
        y_val, x_val = clusters(n_val, 2, centers)
    else:  # features carry no information about the labels
        y_train, x_train = rng.integers(0, 4, n_train), rng.normal(0, 1, (n_train, WIDTH))
        y_val, x_val = rng.integers(0, 4, n_val), rng.normal(0, 1, (n_val, WIDTH))
    # Keys out of order and spread over two files: the reader must sort them.
    write_split(folder, "train", [f"{LABELS[l]}/t{i:04d}.jpg" for i, l in enumerate(y_train)][::-1],
                y_train[::-1], x_train[::-1], n_files=2)
    write_split(folder, "val", [f"{LABELS[l]}/v{i:04d}.jpg" for i, l in enumerate(y_val)], y_val, x_val)
    return folder


def make_params(**train_head):
    settings = {"epochs": 60, "early_stopping_patience": 5, "learning_rate": 0.01, "batch_size": 16, **train_head}
    return params_mod.from_dict({"seed": 7, "train_head": settings})


def run_head(work: Path, bottlenecks: Path, p) -> tuple[dict, dict]:
    labels = work / "labels.json"
    labels.write_text(json.dumps(LABELS))
    outputs = {"head": work / "head", "metrics": work / "metrics.json", "plots": work / "curve.csv",
               "report": work / "report.json"}
    runtime.configure(p.seed)  # as both adapters do before a stage
    result = train_head.run(p, {"bottlenecks": bottlenecks, "labels": labels}, outputs)
    return result, outputs


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    work = tmp_path_factory.mktemp("separable")
    bottlenecks = make_bottlenecks(work / "bottlenecks", separable=True)
    p = make_params()
    result, outputs = run_head(work, bottlenecks, p)
    return work, bottlenecks, p, result, outputs


def test_separable_clusters_are_learned(separable):
    *_, result, outputs = separable
    metrics = json.loads(outputs["metrics"].read_text())
    assert metrics["val_accuracy"] >= 0.9
    assert metrics["accuracy"] >= 0.9
    assert metrics["num_train"] == 160 and metrics["num_val"] == 60
    assert {k: result[k] for k in metrics} == metrics


def test_outputs_are_written(separable):
    *_, result, outputs = separable
    assert sorted(p.name for p in outputs["head"].iterdir()) == [head_lib.HEAD_INFO, head_lib.HEAD_FILE,
                                                                 head_lib.HEAD_HISTORY]
    info = json.loads((outputs["head"] / head_lib.HEAD_INFO).read_text())
    metrics = json.loads(outputs["metrics"].read_text())
    assert info["labels"] == LABELS and info["num_classes"] == 4 and info["feature_width"] == WIDTH
    assert info["best_epoch"] == metrics["best_epoch"] and info["epochs_run"] == metrics["epochs_run"]
    assert set(metrics) == {"accuracy", "loss", "val_accuracy", "val_loss", "best_epoch", "epochs_run",
                            "num_train", "num_val"}
    report = json.loads(outputs["report"].read_text())
    assert report["wall_time_s"] >= 0 and any("CPU" in d for d in report["devices"])
    # Timing stays out of the metrics DVC compares.
    assert "wall_time_s" not in metrics


def test_curve_has_one_row_per_epoch_and_best_row_matches_metrics(separable):
    *_, p, _, outputs = separable
    metrics = json.loads(outputs["metrics"].read_text())
    rows = read_curve(outputs["plots"])
    assert list(rows[0]) == list(recipe.CURVE_COLUMNS)
    assert len(rows) == metrics["epochs_run"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    best = rows[metrics["best_epoch"] - 1]
    assert float(best["val_accuracy"]) == metrics["val_accuracy"]
    assert float(best["val_loss"]) == metrics["val_loss"]
    assert float(best["accuracy"]) == metrics["accuracy"]
    val_losses = [float(r["val_loss"]) for r in rows]
    assert metrics["val_loss"] == min(val_losses)
    # Early stopping: it stops `patience` epochs after the best one (unless epochs ran out first).
    if metrics["epochs_run"] < p.train_head.epochs:
        assert metrics["epochs_run"] == metrics["best_epoch"] + p.train_head.early_stopping_patience


def evaluate_saved_head(head_dir: Path, bottlenecks: Path) -> tuple[float, float]:
    import keras

    model = keras.saving.load_model(head_dir / head_lib.HEAD_FILE)
    _, y_val, x_val = features.read_split(bottlenecks, "val")
    probs = np.asarray(model.predict(x_val, verbose=0))
    loss = float(np.mean(-np.log(probs[np.arange(len(y_val)), y_val])))
    return float(np.mean(probs.argmax(1) == y_val)), loss


def test_saved_head_has_the_best_epochs_weights(separable):
    work, bottlenecks, _, _, outputs = separable
    metrics = json.loads(outputs["metrics"].read_text())
    accuracy, loss = evaluate_saved_head(outputs["head"], bottlenecks)
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-3, abs=1e-5)


def test_same_seed_gives_identical_metrics_files(separable, tmp_path):
    _, bottlenecks, p, _, outputs = separable
    _, again = run_head(tmp_path, bottlenecks, p)
    assert again["metrics"].read_text() == outputs["metrics"].read_text()
    assert again["plots"].read_text() == outputs["plots"].read_text()


def test_another_seed_gives_another_curve(separable, tmp_path):
    _, bottlenecks, p, _, outputs = separable
    other = params_mod.from_dict({**p.to_dict(), "seed": p.seed + 1})
    _, again = run_head(tmp_path, bottlenecks, other)
    assert again["plots"].read_text() != outputs["plots"].read_text()


def test_random_labels_stay_near_chance(tmp_path):
    bottlenecks = make_bottlenecks(tmp_path / "bottlenecks", separable=False)
    result, outputs = run_head(tmp_path, bottlenecks, make_params(epochs=30))
    metrics = json.loads(outputs["metrics"].read_text())
    assert metrics["val_accuracy"] < 0.6
    assert result["val_accuracy"] == metrics["val_accuracy"]


def test_epoch_limit_without_early_stop_keeps_best_weights(tmp_path):
    # Random labels overfit quickly, so val loss is lowest well before the epoch limit.
    bottlenecks = make_bottlenecks(tmp_path / "bottlenecks", separable=False)
    _, outputs = run_head(tmp_path, bottlenecks, make_params(epochs=15, early_stopping_patience=100))
    metrics = json.loads(outputs["metrics"].read_text())
    assert metrics["epochs_run"] == 15 and len(read_curve(outputs["plots"])) == 15
    assert metrics["best_epoch"] < 15  # the case where the last weights are not the best
    accuracy, loss = evaluate_saved_head(outputs["head"], bottlenecks)
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-3, abs=1e-5)


def test_patience_zero_trains_every_epoch_and_reports_the_last(tmp_path, separable):
    _, bottlenecks, *_ = separable
    _, outputs = run_head(tmp_path, bottlenecks, make_params(epochs=4, early_stopping_patience=0))
    metrics = json.loads(outputs["metrics"].read_text())
    rows = read_curve(outputs["plots"])
    assert metrics["epochs_run"] == 4 and metrics["best_epoch"] == 4 and len(rows) == 4
    assert float(rows[-1]["val_loss"]) == metrics["val_loss"]


def test_empty_val_split_is_an_error(tmp_path):
    folder = tmp_path / "bottlenecks"
    y, x = clusters(20, 0, np.eye(4, WIDTH) * 3)
    write_split(folder, "train", [f"k{i}" for i in range(20)], y, x)
    write_split(folder, "val", [], [], np.zeros((0, WIDTH), np.float32))
    with pytest.raises(GraftlineError, match="val"):
        run_head(tmp_path, folder, make_params())
    assert not (tmp_path / "head").exists() and not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------- features.read_split


def test_read_split_sorts_by_key_and_keeps_rows_together(tmp_path):
    rng = np.random.default_rng(3)
    keys = [f"c{i % 3}/p{i:03d}.jpg" for i in rng.permutation(30)]
    labels = [int(k[1]) for k in keys]
    feats = rng.normal(0, 1, (30, 7)).astype(np.float32)
    by_key = {k: (l, f) for k, l, f in zip(keys, labels, feats)}
    write_split(tmp_path, "train", keys, labels, feats, n_files=3)
    write_split(tmp_path, "val", ["zz"], [0], feats[:1])

    got_keys, got_labels, got_feats = features.read_split(tmp_path, "train")
    assert got_keys == sorted(keys)
    assert got_labels.dtype == np.int32 and got_labels.shape == (30,)
    assert got_feats.dtype == np.float32 and got_feats.shape == (30, 7)
    for i, key in enumerate(got_keys):
        assert got_labels[i] == by_key[key][0]
        np.testing.assert_array_equal(got_feats[i], by_key[key][1])
    assert features.count_rows(tmp_path, "train") == 30
    assert features.read_split(tmp_path, "val")[0] == ["zz"]


def test_read_split_without_files_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="test-"):
        features.read_split(tmp_path, "test")


def test_schema_is_fixed_width_float32():
    schema = features.schema(5)
    assert schema.names == [features.KEY, features.LABEL, features.SPLIT, features.FEATURES]
    assert schema.field(features.FEATURES).type == pa.list_(pa.float32(), 5)
    assert schema.field(features.LABEL).type == pa.int32()
    table = features.table([("k", np.int64(2), "train", np.arange(5, dtype=np.float64))], 5)
    assert table.schema.equals(schema)
    assert table.to_pylist() == [{"key": "k", "label": 2, "split": "train", "features": [0.0, 1.0, 2.0, 3.0, 4.0]}]
    with pytest.raises(ValueError, match="5 values"):
        features.table([("k", 0, "train", np.zeros(4))], 5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_rate_schedule_sets_each_epochs_rate_and_a_resumed_fit_continues_it(schedule):
    import keras

    def rates_seen(initial_epoch, epochs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(recipe.make_optimizer("adam", 0.01), "sparse_categorical_crossentropy")
        seen = []
        probe = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: seen.append(float(model.optimizer.learning_rate.numpy())))
        x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int64)
        # the probe runs after the schedule's callback: it sees the rate the epoch trains at
        model.fit(x, y, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                  callbacks=recipe.rate_schedule(schedule, 0.01, 4) + [probe])
        return seen

    full = rates_seen(0, 4)
    if schedule == "constant":
        np.testing.assert_allclose(full, [0.01] * 4, rtol=1e-6)
    else:
        # cos(pi (e + 0.5) / 4) for e = 0..3: every epoch lower, the last near but above 0
        expected = [0.01 * 0.5 * (1 + np.cos(np.pi * (e + 0.5) / 4)) for e in range(4)]
        np.testing.assert_allclose(full, expected, rtol=1e-5)
        assert full[0] < 0.01 and 0 < full[3] < 0.001
    np.testing.assert_allclose(rates_seen(2, 4), full[2:], rtol=1e-6)  # resumed after epoch 2

