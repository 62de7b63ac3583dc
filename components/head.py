"""The classification head and its files, shared by train-head (which trains it on cached features),
fine-tune (which puts it on the base) and the scratch control.

A head folder holds HEAD_FILE (the Keras model), HEAD_INFO (labels, epochs) and HEAD_HISTORY (its
learning curve, CURVE_COLUMNS, from which fine-tune draws the joined curves).
"""
from __future__ import annotations

import sys

HEAD_FILE = "head.keras"
HEAD_INFO = "head.json"
HEAD_HISTORY = "history.csv"
CURVE_COLUMNS = ("epoch", "accuracy", "loss", "val_accuracy", "val_loss")


def make_optimizer(name: str, learning_rate: float):
    import keras

    return {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop,
            "sgd": keras.optimizers.SGD}[name](learning_rate=learning_rate)


def build_head(feature_width: int, num_classes: int, dropout: float, hidden_units: int = 0):
    """Dropout + Dense softmax, with an optional ReLU hidden layer (and its own dropout) between."""
    import keras

    inputs = keras.Input((feature_width,), name="features")
    x = keras.layers.Dropout(dropout, name="head_dropout")(inputs)
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    # float32 whatever the global policy: under mixed precision a float16 softmax loses small probabilities.
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head_dense", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="head")


def keras_verbosity() -> int:
    """A live bar on a terminal, one line per epoch in logs (DVC, CI)."""
    return 1 if sys.stdout.isatty() else 2


def curve_rows(history: dict, first_epoch: int) -> list[list]:
    n = len(history["loss"])
    return [[first_epoch + i] + [round(float(history[c][i]), 6) for c in CURVE_COLUMNS[1:]] for i in range(n)]
