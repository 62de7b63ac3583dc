"""The classification head and its files, shared by train-head (which trains it on cached features),
fine-tune (which puts it on the base) and the scratch control. How they train it is components/recipe.py.

A head folder holds HEAD_FILE (the Keras model), HEAD_INFO (labels, epochs) and HEAD_HISTORY (its
learning curve, recipe.CURVE_COLUMNS, from which fine-tune draws the joined curves).
"""
from __future__ import annotations

HEAD_FILE = "head.keras"
HEAD_INFO = "head.json"
HEAD_HISTORY = "history.csv"


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
