"""How the training stages train: the optimizer, the learning-rate schedule, early stopping and the choice
of the epoch whose figures are reported, and the per-epoch curve rows they write. train-head, fine-tune and
the scratch control use these, once.
"""
from __future__ import annotations

import math
import sys

CURVE_COLUMNS = ("epoch", "accuracy", "loss", "val_accuracy", "val_loss")


def make_optimizer(name: str, learning_rate: float):
    import keras

    return {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop,
            "sgd": keras.optimizers.SGD}[name](learning_rate=learning_rate)


def keras_verbosity() -> int:
    """A live bar on a terminal, one line per epoch in logs (DVC, CI)."""
    return 1 if sys.stdout.isatty() else 2


def curve_row(epoch: int, logs: dict) -> list:
    """One CURVE_COLUMNS row: the epoch's number and its Keras logs, rounded as every curve file holds them."""
    return [epoch] + [round(float(logs[c]), 6) for c in CURVE_COLUMNS[1:]]


def curve_rows(history: dict, first_epoch: int) -> list[list]:
    """Keras' History as CURVE_COLUMNS rows, epochs numbered from ``first_epoch``."""
    return [curve_row(first_epoch + i, {c: history[c][i] for c in CURVE_COLUMNS[1:]})
            for i in range(len(history["loss"]))]


def early_stopping(patience: int, resumed: dict | None = None, best_weights=None) -> list:
    """Both training stages' rule: stop when val loss has not improved for ``patience`` epochs and
    keep the best epoch's weights (no callback when patience is 0: every epoch runs, the last is kept).

    ``resumed`` ({wait, best, best_epoch}) and ``best_weights``: the callback's state after the last epoch of a
    killed run, so that the resumed run stops and restores exactly where one that ran through would.
    """
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if resumed:
                self.wait, self.best, self.best_epoch = resumed["wait"], resumed["best"], resumed["best_epoch"]
                self.best_weights = best_weights

    return [ResumableEarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
            ] if patience else []


def scheduled_rate(schedule: str, learning_rate: float, epoch: int, epochs: int) -> float:
    """Epoch ``epoch``'s (0-based) learning rate: ``learning_rate`` for ``constant``; for ``cosine``, on a
    cosine from ``learning_rate`` to 0 over ``epochs``, taken at the epoch's middle (the mean of a per-step
    cosine over that epoch, to within a few percent)."""
    if schedule == "constant":
        return learning_rate
    return learning_rate * 0.5 * (1 + math.cos(math.pi * (epoch + 0.5) / epochs))


def rate_schedule(schedule: str, learning_rate: float, epochs: int) -> list:
    """The callbacks that set each epoch's learning rate to scheduled_rate (none for ``constant``).

    Keyed by the epoch's index, so a resumed run (fit's initial_epoch) continues the same curve.
    """
    import keras

    if schedule == "constant":
        return []
    return [keras.callbacks.LearningRateScheduler(
        lambda epoch, _rate: scheduled_rate(schedule, learning_rate, epoch, epochs))]


def best_row(rows: list[list], patience: int) -> list:
    """The curve row whose weights early_stopping(patience) kept: the lowest val loss (the first of
    equals, as Keras keeps it), or the last row without early stopping."""
    val_loss = CURVE_COLUMNS.index("val_loss")
    return min(rows, key=lambda row: row[val_loss]) if patience else rows[-1]
