"""Stage 3, train-head: Dropout + Dense softmax head on the cached Parquet features.

No image is decoded here, so an epoch costs milliseconds: the head trains up
to ``train_head.epochs`` and stops when val loss has not improved for
``early_stopping_patience`` epochs, keeping the best epoch's weights.

Outputs: ``head`` (head.keras + head.json), ``metrics`` (the best epoch's
train/val loss and accuracy), ``plots`` (one CSV row per epoch), ``report``
(wall time; devices, strategy and dtype policy from components.devices).
"""
from __future__ import annotations

import time
from pathlib import Path

from components import callbacks as callbacks_mod
from components import devices, features, multi_worker
from components.atomic import atomic_dir, read_json, write_csv, write_json
from components.errors import GraftlineError
from components.head import HEAD_FILE, HEAD_HISTORY, HEAD_INFO, build_head
from components.recipe import (CURVE_COLUMNS, best_row, curve_rows, early_stopping, keras_verbosity,
                               make_optimizer)

VAL_BATCH_SIZE = 32  # Keras' default for validation arrays


def class_weights(labels, num_classes: int) -> dict[int, float]:
    """'auto': weight each class by n / (classes x its count), so rare classes count as much in the loss."""
    import numpy as np

    counts = np.bincount(labels, minlength=num_classes)
    return {c: float(len(labels) / (num_classes * n)) if n else 0.0 for c, n in enumerate(counts)}


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: bottlenecks, labels. outputs: head (folder), metrics (JSON), plots (CSV), report (JSON).

    With several workers (train.strategy: multi_worker) every worker trains and
    saves, but only the chief's files land in ``outputs`` (multi_worker.worker_outputs).
    """
    # Device setup was done by the adapter (pipeline/runtime.py); here it is only read.
    strategy = devices.strategy(params.train.strategy)
    with multi_worker.worker_outputs(strategy, outputs, "train-head") as written:
        return train_and_save(params, inputs, written, strategy)


def train_and_save(params, inputs: dict, outputs: dict, strategy) -> dict:
    """run's work in the given distribution strategy, writing to ``outputs``."""
    import tensorflow as tf

    started = time.time()
    p = params.train_head
    labels = read_json(Path(inputs["labels"]))
    _, y_train, x_train = features.read_split(Path(inputs["bottlenecks"]), "train")
    _, y_val, x_val = features.read_split(Path(inputs["bottlenecks"]), "val")
    if len(x_train) == 0 or len(x_val) == 0:
        raise GraftlineError("train-head needs photos in both the train and val splits; add photos")

    placement = devices.placement(strategy, p.batch_size)
    with strategy.scope():
        head = build_head(x_train.shape[1], len(labels), p.dropout, p.hidden_units)
        head.compile(optimizer=make_optimizer(p.optimizer, p.learning_rate),
                     loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    replicas = placement["replicas"]
    batch_size = devices.batch_for(placement["global_batch_size"], replicas, len(x_train), "train-head: train split")
    batches = devices.shard_by_data(tf.data.Dataset.from_tensor_slices((x_train, y_train))
                                    .shuffle(len(x_train), seed=params.seed, reshuffle_each_iteration=True)
                                    .batch(batch_size))
    callbacks = callbacks_mod.tensorboard(outputs) + early_stopping(p.early_stopping_patience)
    val_batch_size = devices.batch_for(VAL_BATCH_SIZE * replicas, replicas, len(x_val), "train-head: val split")
    weights = class_weights(y_train, len(labels)) if p.class_weights == "auto" else None
    fit = head.fit(batches, validation_data=(x_val, y_val), epochs=p.epochs, shuffle=False,  # shuffled above
                   validation_batch_size=val_batch_size, class_weight=weights, callbacks=callbacks,
                   verbose=keras_verbosity())
    callbacks_mod.write_live(outputs, callbacks_mod.epoch_logs(fit.history))
    rows = curve_rows(fit.history, 1)
    epochs_run = len(rows)
    # With early stopping the weights are the best epoch's, and so are the reported figures.
    best = best_row(rows, p.early_stopping_patience)

    info = {"epochs_run": epochs_run, "best_epoch": best[0], "feature_width": int(x_train.shape[1]),
            "num_classes": len(labels), "labels": labels}
    with atomic_dir(Path(outputs["head"])) as tmp:
        head.save(tmp / HEAD_FILE)
        write_json(tmp / HEAD_INFO, info)
        write_csv(tmp / HEAD_HISTORY, CURVE_COLUMNS, rows)  # fine-tune draws the joined curves from it
    write_csv(Path(outputs["plots"]), CURVE_COLUMNS, rows)
    metrics = {
        **dict(zip(CURVE_COLUMNS[1:], best[1:])),  # accuracy, loss, val_accuracy, val_loss
        "best_epoch": best[0],
        "epochs_run": epochs_run,
        "num_train": int(len(x_train)),
        "num_val": int(len(x_val)),
    }
    write_json(Path(outputs["metrics"]), metrics)
    # Timing and devices vary run to run, so they go to the report, not the metrics DVC compares.
    report = {"wall_time_s": round(time.time() - started, 2), **placement,
              "batch_sizes": {"train": batch_size, "val": val_batch_size}, "class_weights": weights}
    write_json(Path(outputs["report"]), report)
    return {**metrics, **report}
