"""What a training stage logs epoch by epoch beside its own curve: TensorBoard and DVCLive.

- ``outputs["tensorboard"]`` (logs/<stage>, git-ignored, not a DVC output): Keras'
  TensorBoard callback, written as the epochs go, so ``tensorboard --logdir logs``
  follows a running stage as TensorFlow users expect. Emptied at the start of a run
  (a resumed fine-tune keeps it).
- ``outputs["live"]`` (dvclive/<stage>, declared in dvc.yaml): DVCLive's files
  (metrics.json, one TSV per metric) written by DVCLive's own Keras callback from the
  epochs' logs once the stage has them all, so they are part of the stage's output set
  (components.atomic.output_set): whole, the same for a resumed run as for one that ran
  through, never a killed run's half. ``dvc exp show`` and ``dvc plots`` read them as in any
  DVCLive project. metrics.json holds the figures and step only (no time): deterministic.

An adapter that passes neither (the TFX path) gets neither.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def tensorboard(outputs: dict, resumed: bool = False) -> list:
    """Keras' TensorBoard callback when ``outputs`` asks for its logs (a resumed run appends to them)."""
    if "tensorboard" not in outputs:
        return []
    import keras

    folder = Path(outputs["tensorboard"])
    if not resumed:
        shutil.rmtree(folder, ignore_errors=True)
    return [keras.callbacks.TensorBoard(log_dir=str(folder), write_graph=False, profile_batch=0)]


def epoch_logs(history: dict) -> list[dict]:
    """Keras' History (metric -> values) as one logs dict per epoch, as callbacks receive them."""
    epochs = len(next(iter(history.values()), []))
    return [{metric: values[i] for metric, values in history.items()} for i in range(epochs)]


def write_live(outputs: dict, logs: list[dict]) -> None:
    """DVCLive's files for these epochs' logs in ``outputs["live"]``, as its callback writes them during fit."""
    if "live" not in outputs:
        return
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    folder = Path(outputs["live"])
    shutil.rmtree(folder, ignore_errors=True)
    callback = DVCLiveCallback(live=Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None))
    for epoch, epoch_log in enumerate(logs):
        callback.on_epoch_end(epoch, epoch_log)
    callback.on_train_end()
    # No epoch (fine_tune.epochs 0, several frozen bases): DVCLive writes no plots, but dvc.yaml names the folder.
    (folder / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
