"""The frozen backbone as a Beam RunInference model handler: a shard's images in, pooled features out.

The bottleneck stage's pipeline hands each shard's cache misses (a ``ShardWork``) to
``FeatureExtractorHandler``, which builds the backbone's extractor (components/backbone.py: every
base with its preprocessing) once per worker process and runs decode + resize + the extractor in one
``tf.function``, in batches of ``bottleneck.batch_size``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference import base as beam_inference
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from components import images
from components.backbone import Backbone

# Beam 2.77 imports `resource` together with an optional torch-only module, so
# without torch it loses `resource` too and warns on every batch that memory
# cannot be measured. Give it the standard module back (runs in every worker
# that unpickles this module's handler).
if getattr(beam_inference, "resource", True) is None:
    import resource as _resource

    beam_inference.resource = _resource

# Extractors and their tf.functions built in this process, by backbone: the one run() builds to
# check the weights is reused by an in-memory runner's handler, and a Dask worker builds one for all
# the shards it is given.
_EXTRACTORS: dict[Backbone, Any] = {}
_INFER_FUNCTIONS: dict[Backbone, Any] = {}


def extractor_for(backbone: Backbone):
    if backbone not in _EXTRACTORS:
        _EXTRACTORS[backbone] = backbone.extractor()
    return _EXTRACTORS[backbone]


@dataclasses.dataclass
class ShardWork:
    """One shard on its way through the pipeline: its rows, the cached features, the misses."""
    split: str
    part: str  # the Parquet file this shard becomes
    keys: list[str]
    labels: list[int]
    sha256s: list[str]  # of the encoded bytes the network sees: the cache key
    cached: dict[int, np.ndarray]  # row index -> features from the cache
    missing: list[int]  # row indices to compute, in order
    images: list[bytes]  # their encoded bytes
    rejected: int  # cache entries that existed but were unreadable (recomputed)


class FeatureExtractorHandler(ModelHandler[ShardWork, PredictionResult, Any]):
    """A shard's missing images -> pooled base features, in batches of batch_size, in one tf.function.

    RunInference gets it pre-batched (``with_no_batching``): its element is a
    list of ShardWork, so no batch is formed in finish_bundle, which the
    DaskRunner would drop.
    """

    def __init__(self, backbone: Backbone, batch_size: int, tf_threads: int = 0):
        super().__init__()
        self._backbone = backbone
        self._batch_size = batch_size
        self._tf_threads = tf_threads
        self._bar = None

    def load_model(self):
        import tensorflow as tf

        if self._backbone in _INFER_FUNCTIONS:  # the Dask runner sets the DoFn up once per shard
            return _INFER_FUNCTIONS[self._backbone]
        if self._tf_threads:
            try:  # a fresh worker process: size its pools so workers x threads <= cores
                tf.config.threading.set_intra_op_parallelism_threads(self._tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._tf_threads)
            except RuntimeError:
                pass  # TensorFlow already running in this process (in-memory mode): keep its pools
        extractor = extractor_for(self._backbone)
        image_size = self._backbone.image_size

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True)
        def infer(image_bytes):
            return extractor(images.decode_batch(image_bytes, image_size), training=False)

        infer.extractor = extractor  # keep the Keras model alive with its function
        _INFER_FUNCTIONS[self._backbone] = infer
        return infer

    def run_inference(self, batch: Sequence[ShardWork], model, inference_args=None) -> Iterable[PredictionResult]:
        import tensorflow as tf

        results = []
        for work in batch:
            chunks = [model(tf.constant(work.images[i:i + self._batch_size])).numpy()
                      for i in range(0, len(work.images), self._batch_size)]
            self._progress(len(work.images))
            results.append(PredictionResult(work, np.concatenate(chunks) if chunks else None))
        return results

    def _progress(self, n: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(desc=f"bottleneck: forward passes (pid {os.getpid()})", unit="img")
        self._bar.update(n)

    def get_num_bytes(self, batch: Sequence[ShardWork]) -> int:
        return sum(len(b) for work in batch for b in work.images)

    def get_metrics_namespace(self) -> str:
        return "graftline_bottleneck"
