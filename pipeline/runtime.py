"""Process-wide setup both adapters do before a stage: quiet logs, seeds, determinism."""
from __future__ import annotations

import logging
import os
import random
import warnings

# Set before TensorFlow is imported anywhere: fewer C++ log lines to hide (pipeline/console.py);
# GRAFTLINE_VERBOSE=1 asks for all of them.
if os.environ.get("GRAFTLINE_VERBOSE") != "1":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
class _UnusedFileSystems(logging.Filter):
    """Beam names each cloud filesystem whose client library is missing when it is imported; graftline
    uses them only for gs:// or s3:// locations, where Beam then fails with a clear error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("GRAFTLINE_VERBOSE") == "1" or not record.getMessage().startswith("Failed to import")


logging.getLogger("apache_beam.io.filesystems").addFilter(_UnusedFileSystems())


class _Interruptions(logging.Filter):
    """Beam logs what a step raised, with its traceback, before raising it on: for Ctrl-C or SIGTERM the stage's
    one line says it all (pipeline/cli.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


logging.getLogger("apache_beam.runners.common").addFilter(_Interruptions())
# Keras says this at the end of every first epoch over a tf.data.Dataset of unknown length.
warnings.filterwarnings("ignore", message="Your input ran out of data")


def configure(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and turn on op determinism (same params -> same metrics)."""
    import keras
    import numpy as np
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)  # also seeds tf.random and Python's hash-free RNGs
    tf.config.experimental.enable_op_determinism()


def configure_devices(stage, params, own_process: bool = True) -> None:
    """Device setup before a stage (a pipeline.stages.Stage), the same from both adapters.

    Training stages (``stage.trains``) follow train.device and train.mixed_precision; the others
    run in float32 (the dtype policy is process-wide, so a training stage's must not leak into
    them). When the stage has a process of its own (the CLI), a ``cpu_only`` stage also hides
    any GPU; TFX's LocalDagRunner runs every stage in one process, where that would hide the
    GPUs from training too.
    """
    if stage.trains:
        configure_training(params.train)
        return
    import keras

    keras.mixed_precision.set_global_policy("float32")
    if own_process and stage.cpu_only:
        cpu_only()


def configure_training(train) -> None:
    """Before train-head or fine-tune: apply ``train.device``, ``train.mixed_precision`` and ``train.strategy``.

    cpu hides the GPUs; gpu turns memory growth on (TensorFlow would otherwise
    take all GPU memory up front); the Keras dtype policy is chosen by
    components.devices.choose_policy. Visible devices and memory growth can only
    change before TensorFlow initialises its devices, so in one process that runs
    several stages (TFX's LocalDagRunner) the first call decides; a later call
    asking for something else is an error, not a silent run elsewhere.
    multi_worker: TF_CONFIG is checked before anything else, and the
    MultiWorkerMirroredStrategy is made right after the devices are chosen,
    before any other TensorFlow op (TensorFlow's rule; it starts this worker's
    gRPC server and joins the cluster); the stage gets the same one back from
    components.devices.strategy.
    """
    from components import devices, multi_worker
    from components.errors import GraftlineError

    cluster, device = check_training(train)
    import keras
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    try:
        if gpus:
            tf.config.set_visible_devices([] if device == "cpu" else gpus, "GPU")
        if device == "gpu":
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        raise GraftlineError(
            f"params: train.device = {train.device!r} cannot take effect: TensorFlow already set up its devices "
            "in this process for an earlier stage; run each stage in its own process (graftline <stage>)"
        ) from None
    if cluster:
        task = cluster["task"]
        print(f"train.strategy multi_worker: {task['type']}:{task['index']} of {multi_worker.worker_count(cluster)} "
              "workers (TF_CONFIG); waiting until every one has joined", flush=True)
        multi_worker.multi_worker()
    keras.mixed_precision.set_global_policy(devices.choose_policy(train.mixed_precision, device))


def check_training(train) -> tuple[dict | None, str]:
    """A training stage's pre-flight: (TF_CONFIG's cluster or None, the device it will use).

    A missing or bad TF_CONFIG fails first, before TensorFlow's import; a GPU asked for and not
    there fails next. Both come before the stage looks for its inputs: no input fixes them.
    """
    from components import devices, multi_worker

    cluster = multi_worker.tf_config(os.environ.get("TF_CONFIG")) if train.strategy == "multi_worker" else None
    import tensorflow as tf
    return cluster, devices.choose_device(train.device, len(tf.config.list_physical_devices("GPU")))


def cpu_only() -> None:
    """Before a stage or command that never uses a GPU (evaluate, predict): hide any, for the same figures on CPU
    and GPU runners."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.set_visible_devices([], "GPU")
