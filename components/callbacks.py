"""What a training stage logs epoch by epoch beside its own curve: TensorBoard and DVCLive.

- ``outputs["tensorboard"]`` (logs/<stage>, git-ignored, not a DVC output): Keras'
  TensorBoard callback, so ``tensorboard --logdir logs`` works as TensorFlow users
  expect. Emptied at the start of a run (a resumed fine-tune keeps it).
- ``outputs["live"]`` (dvclive/<stage>, declared in dvc.yaml): DVCLive's Keras
  callback writes metrics.json and one TSV per metric after every epoch, so
  ``dvc exp show`` shows a running experiment's latest epoch and ``dvc plots``
  reads the curves as in any DVCLive project. Its metrics.json holds the epoch's
  figures and step only (no time): deterministic, like every metrics file here.

An adapter that passes neither (the TFX path) gets neither.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def epoch_loggers(outputs: dict, resumed_after: int = 0) -> list:
    """Keras callbacks for the logs ``outputs`` asks for; ``resumed_after``: the epochs a resumed run
    already has (its DVCLive steps go on from there, even if the killed run died before logging its last)."""
    resumed = resumed_after > 0
    import keras

    callbacks = []
    if "tensorboard" in outputs:
        folder = Path(outputs["tensorboard"])
        if not resumed:
            shutil.rmtree(folder, ignore_errors=True)
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(folder), write_graph=False, profile_batch=0))
    if "live" in outputs:
        from dvclive import Live
        from dvclive.keras import DVCLiveCallback

        live = Live(dir=str(outputs["live"]), resume=resumed, save_dvc_exp=False, dvcyaml=None)
        if resumed:
            live.step = resumed_after  # DVCLive's step is the epoch's index
        callbacks.append(DVCLiveCallback(live=live))
    return callbacks
