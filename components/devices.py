"""Where training runs: the choices behind ``train.device``, ``train.mixed_precision`` and ``train.strategy``.

Two halves, kept apart because a component never touches process-wide state (docs/architecture.md):

- pure choices (``choose_device``, ``choose_policy``), which
  ``pipeline/runtime.py`` applies to TensorFlow before a training stage (visible devices, GPU memory growth, Keras' global dtype
  policy, and for ``multi_worker`` the MultiWorkerMirroredStrategy, which
  TensorFlow only allows before it has run anything);
- readers of what was set up (``strategy``, ``placement``), which train_head
  and fine_tune call to build their model in the right distribution strategy
  and to write into their report what they ran on.

Training on several machines (TF_CONFIG, the chief, keeping every output but
the chief's out of the real paths) is components/multi_worker.py's.
"""
from __future__ import annotations

import functools
import re

from components import multi_worker
from components.errors import GraftlineError
from components.multi_worker import MULTI_WORKER

MIXED = "mixed_float16"
FLOAT32 = "float32"
# What the reports call the strategies (tf.distribute.MultiWorkerMirroredStrategy's class is
# CollectiveAllReduceStrategy, so its name is spelt here).
DEFAULT = "default (one device)"


def choose_device(setting: str, num_gpus: int) -> str:
    """'cpu' or 'gpu' for ``train.device`` (auto | cpu | gpu) given how many GPUs TensorFlow sees."""
    if setting == "gpu" and num_gpus == 0:
        raise GraftlineError(
            "params: train.device = 'gpu', but TensorFlow sees no GPU on this machine; use train.device: auto "
            "(GPU when there is one) or cpu, or run where nvidia-smi lists a GPU and TensorFlow has its CUDA "
            "libraries (pip install 'tensorflow[and-cuda]')"
        )
    if setting == "cpu":
        return "cpu"
    return "gpu" if num_gpus else "cpu"


def choose_policy(setting: str, device: str) -> str:
    """Keras dtype policy for ``train.mixed_precision`` (auto | on | off): auto is mixed on GPU only.

    float16 compute pays off on GPUs (tensor cores); on CPUs it is slower and
    changes the figures, so auto keeps CPU runs float32 and bit-for-bit as before.
    """
    if setting == "on":
        return MIXED
    if setting == "off":
        return FLOAT32
    return MIXED if device == "gpu" else FLOAT32


def _training_devices() -> list[str]:
    """Logical devices training can use: the GPUs when any are visible, else the CPUs."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def strategy(setting: str = "auto"):
    """The distribution strategy ``train.strategy`` names (auto | one_device | mirrored | multi_worker).

    auto: MirroredStrategy over the training devices when there are several,
    else TensorFlow's default. Several logical CPUs only exist when someone
    configured them (the tests do, to run the multi-replica path without GPUs);
    a plain CPU machine has one. one_device: TensorFlow's default (the first
    device) whatever is visible. mirrored: MirroredStrategy over every visible
    training device, even one. multi_worker: this process's
    MultiWorkerMirroredStrategy (see ``multi_worker``), made by
    pipeline/runtime.py before TensorFlow started.
    """
    import tensorflow as tf

    if setting == "multi_worker":
        return multi_worker.multi_worker()
    if setting == "one_device":
        return tf.distribute.get_strategy()
    names = _training_devices()
    return _mirrored(tuple(names)) if setting == "mirrored" or len(names) > 1 else tf.distribute.get_strategy()


@functools.lru_cache(maxsize=None)
def _mirrored(names: tuple[str, ...]):
    """One MirroredStrategy per device set and process: a second one's all-reduce keys collide with the
    first's (seen with train_head then fine_tune in one process, as under TFX's LocalDagRunner)."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(names))


def placement(strategy, batch_size_per_replica: int | None = None) -> dict:
    """What a training stage writes into its report: devices, strategy, replicas, dtype policy, batch sizes.

    The global batch (what the input pipeline batches by) is the per-replica
    batch size from params times the replicas (over every worker), so each
    device sees the batch size the params name. Several workers: also how many,
    which task this process is and whether it is the chief; ``devices`` are
    this worker's own.
    """
    import keras

    replicas = int(strategy.num_replicas_in_sync)
    name = strategy_name(strategy)
    used = ([re.sub(r"^/job:[^/]+/replica:\d+/task:\d+", "", d) for d in strategy.extended.worker_devices]
            if name != DEFAULT else _training_devices()[:1])
    found = {
        "device": "gpu" if any("GPU" in d for d in used) else "cpu",
        "devices": used,
        "strategy": name,
        "replicas": replicas,
        "mixed_precision": keras.mixed_precision.global_policy().name,
    }
    if name == MULTI_WORKER:
        found.update(multi_worker.role(strategy))
    if batch_size_per_replica is not None:
        found.update(batch_size_per_replica=batch_size_per_replica,
                     global_batch_size=batch_size_per_replica * replicas)
    return found


def batch_for(global_batch: int, replicas: int, examples: int, what: str) -> int:
    """The batch size for ``examples`` items on ``replicas`` devices (``what`` names them in errors).

    One replica: the global batch, unchanged. Several: MirroredStrategy cuts
    each batch into per-replica slices of size/replicas, filling replicas in
    order, and two cuts break Keras 3.15 / TensorFlow 2.21 (both reproduced on two
    logical CPUs): a partial first batch (Keras builds the model from it averaged
    over replicas, which needs equal slices: keras-team/keras#19246) and a last
    batch that leaves a replica empty (NaN loss, or a shape error). So: the
    largest multiple of ``replicas`` up to the global batch and the number of
    examples whose last batch reaches every replica.
    """
    if replicas == 1:
        return global_batch
    for size in range(min(global_batch, examples) // replicas * replicas, 0, -replicas):
        last = examples % size
        if last == 0 or last > size - size // replicas:  # the last replica's slice is not empty
            return size
    raise GraftlineError(
        f"{what}: {examples} examples cannot be batched so that each of the {replicas} replicas gets some "
        "in every batch; add photos, or train on one device (train.device: cpu, or CUDA_VISIBLE_DEVICES=0)"
    )


def strategy_name(strategy) -> str:
    """What the reports call a strategy: MirroredStrategy, MultiWorkerMirroredStrategy or the default."""
    if multi_worker.is_multi_worker(strategy):
        return MULTI_WORKER
    return "MirroredStrategy" if type(strategy).__name__ == "MirroredStrategy" else DEFAULT


def shard_by_data(dataset):
    """``dataset`` split over several workers by element, not by file (no effect with one worker).

    tf.data's AUTO policy shards by file when several workers read it: with
    fewer shard files than workers (a small folder, one shard per split) some
    workers would get no data, and in-memory arrays have no files at all. By
    element, every worker reads the whole (same-seeded, so same-order) input and
    keeps its own slice of each global batch: the same number of steps on every
    worker, which the collective all-reduce needs (a worker with one step less
    leaves the others waiting forever).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def visible() -> list[str]:
    """Every logical device TensorFlow sees (what the non-training stages report)."""
    import tensorflow as tf

    return [d.name for d in tf.config.list_logical_devices()]
