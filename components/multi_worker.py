"""Training on several machines (``train.strategy: multi_worker``): TF_CONFIG, the chief, and the
MultiWorkerMirroredStrategy, behind a seam the one-machine path passes through unchanged.

A training stage calls ``worker_outputs`` (the real output paths on the chief and in any
one-process run; a removed temporary folder on the other workers) and ``same_on_every_worker``
(True at once with one process). pipeline/runtime.py checks TF_CONFIG (``tf_config``) before
TensorFlow's import and makes the strategy (``multi_worker``) before anything else runs;
components.devices.strategy returns that same object.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from components.errors import GraftlineError

MULTI_WORKER = "MultiWorkerMirroredStrategy"  # what the reports call the strategy



def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)  # class CollectiveAllReduceStrategy


# Task types that train under MultiWorkerMirroredStrategy (an "evaluator" only watches, a "ps" is another strategy's).
TRAINING_TASKS = ("chief", "worker")
TF_CONFIG_HOW = ('set TF_CONFIG in each worker\'s environment to JSON like {"cluster": {"worker": '
                 '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}} (index: this '
                 'worker\'s place in the list; the same cluster everywhere)')


def tf_config(text: str | None) -> dict:
    """TF_CONFIG for ``train.strategy: multi_worker``, checked: {"cluster": {...}, "task": {"type", "index"}}.

    ``text`` is the environment variable's value (None when unset). Anything
    MultiWorkerMirroredStrategy could not train with is a one-line error that
    says what to set, before TensorFlow starts a server or waits for peers.
    """
    def fail(what: str):
        raise GraftlineError(f"params: train.strategy = 'multi_worker' needs the TF_CONFIG environment variable, "
                             f"but {what}; {TF_CONFIG_HOW}, or use train.strategy: auto for one machine")

    if text is None or not text.strip():
        fail("it is not set" if text is None else "it is empty")
    try:
        config = json.loads(text)
    except ValueError as exc:
        fail(f"it is not JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        fail('it has no "cluster" object')
    cluster = config["cluster"]
    for job, addresses in cluster.items():
        if job not in TRAINING_TASKS + ("evaluator",):
            fail(f'its cluster has a {job!r} job (MultiWorkerMirroredStrategy has only "chief" and "worker")')
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and re.fullmatch(r"\S+:\d+", a) for a in addresses)):
            fail(f'cluster "{job}" is not a list of "host:port" addresses: {json.dumps(addresses)}')
    if len(cluster.get("chief", [])) > 1:
        fail(f'cluster "chief" lists {len(cluster["chief"])} addresses (at most one)')
    if not any(job in cluster for job in TRAINING_TASKS):
        fail('its cluster has no "worker" (or "chief") addresses')
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in TRAINING_TASKS:
        fail(f'its "task" is {json.dumps(task)}, not {{"type": "worker" (or "chief"), "index": N}}')
    index = task.get("index", 0)
    if task["type"] not in cluster:
        fail(f'its task type {task["type"]!r} is not in its cluster')
    if type(index) is not int or not 0 <= index < len(cluster[task["type"]]):
        fail(f'its task index {json.dumps(index)} is not 0..{len(cluster[task["type"]]) - 1} '
             f'(the {task["type"]} addresses listed)')
    return {"cluster": cluster, "task": {"type": task["type"], "index": index}}


def is_chief(config: dict) -> bool:
    """The chief writes the outputs: task type "chief", or worker 0 when the cluster has no chief."""
    task = config["task"]
    return task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0
                                       and "chief" not in config["cluster"])


def worker_count(config: dict) -> int:
    """Processes that train together: the chief (if any) and the workers."""
    return sum(len(config["cluster"].get(job, [])) for job in TRAINING_TASKS)


def multi_worker():
    """This process's MultiWorkerMirroredStrategy, from TF_CONFIG (one per process, like ``_mirrored``).

    TensorFlow only allows it before anything else ran (its collective ops and
    gRPC server are set up with the eager context), so pipeline/runtime.py makes
    it first and the training stages get the same object back here.
    """
    return _multi_worker(json.dumps(tf_config(os.environ.get("TF_CONFIG")), sort_keys=True))


@functools.lru_cache(maxsize=None)
def _multi_worker(config: str):
    import tensorflow as tf

    class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """MultiWorkerMirroredStrategy whose ``reduce`` takes what Keras 3.15's ``fit`` gives it.

        Keras (keras-team/keras#20585) calls ``strategy.reduce`` on the whole
        (images, labels) batch when it builds the model, which TensorFlow's
        multi-worker reduce rejects ("Attempt to convert a value (PerReplica...)
        to a Tensor"), and with ``axis=0`` on each step's scalar metrics ("Invalid
        reduction dimension 0 for input with 0 dimensions"). Reduced here one value
        at a time, scalars across replicas: the mean Keras takes over one
        machine's replicas (checked on a model without dropout: two workers give
        the loss and accuracy of one process with the same global batch).
        """

        def reduce(self, reduce_op, value, axis):
            def one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return super(KerasMultiWorkerMirroredStrategy, self).reduce(reduce_op, v, None if rank == 0 else axis)

            return tf.nest.map_structure(one, value)

    try:
        # TFConfigClusterResolver reads the same TF_CONFIG (and counts this worker's GPUs).
        return KerasMultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as exc:
        if "startup" not in str(exc) and "already configured" not in str(exc):
            raise
        raise GraftlineError(
            "params: train.strategy = 'multi_worker' cannot take effect: TensorFlow already ran in this process "
            "before the strategy was made (TensorFlow allows it only at program start); run each stage in its "
            "own process (graftline train-head, graftline fine-tune)"
        ) from None


def role(strategy) -> dict:
    """Several workers: {"workers": N, "task": "worker:1", "chief": bool}; one process: it is the chief."""
    if not is_multi_worker(strategy):
        return {"workers": 1, "chief": True}
    resolver = strategy.cluster_resolver
    cluster = {job: list(addresses) for job, addresses in resolver.cluster_spec().as_dict().items()}
    config = {"cluster": cluster, "task": {"type": resolver.task_type, "index": int(resolver.task_id)}}
    return {"workers": worker_count(config), "task": f"{resolver.task_type}:{resolver.task_id}",
            "chief": is_chief(config)}


@contextlib.contextmanager
def worker_outputs(strategy, outputs: dict, stage: str) -> Iterator[dict]:
    """The output paths this process writes to: the real ones on the chief (and in any one-process run).

    Every worker of a MultiWorkerMirroredStrategy runs the whole stage, saving
    included (reading mirrored and on-read variables can be a collective op,
    which hangs unless every worker takes part), but only the chief's files may
    land in the real outputs: the others write the same names under a
    temporary folder, removed when the stage ends, however it ends. A worker
    that stops makes TensorFlow abort the others' collectives; that becomes one
    line that points at the other workers' logs.
    """
    if not is_multi_worker(strategy):
        yield outputs
        return
    import tensorflow as tf

    me = role(strategy)
    scratch = None if me["chief"] else Path(tempfile.mkdtemp(prefix="graftline-worker-"))
    print(f"{stage}: {me['task']}, one of {me['workers']} workers, " +
          ("the chief: it writes the outputs" if scratch is None else
           f"not the chief: its copies of the outputs go to {scratch}, removed at the end"), flush=True)
    try:
        yield outputs if scratch is None else {key: scratch / key / Path(path).name for key, path in outputs.items()}
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as exc:
        said = ""
        for sentence in re.split(r"(?<=\.) ", " ".join(re.sub(r"\{\{[^}]*\}\}", "", exc.message).split())):
            if said and len(said) + len(sentence) > 200:
                break
            said = f"{said} {sentence}".strip()
        raise GraftlineError(
            f"train.strategy = 'multi_worker': another worker stopped or cannot be reached, so {me['task']} stopped "
            f"too; that worker's log says why (TensorFlow: {said})"
        ) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def same_on_every_worker(strategy, value: int) -> bool:
    """Whether every worker holds the same ``value`` (an all-reduce; True at once with one process).

    Every worker calls it at the same point (it is a collective op). Equal
    values are exactly those where (sum v)^2 == n * sum v^2.
    """
    import tensorflow as tf

    if not is_multi_worker(strategy):
        return True
    mine = tf.constant([float(value), float(value) ** 2, 1.0], tf.float64)
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: mine)
    total, squares, n = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
    return total * total == n * squares
