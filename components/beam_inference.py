"""The frozen backbone as a Beam RunInference model handler: a shard's images in, pooled features out.

The bottleneck stage's pipeline hands each shard's cache misses (a ``ShardWork``) to
``FeatureExtractorHandler``, which sets its engine up once per worker process (components/engines.py:
the backbone converted to LiteRT, or the Keras extractor of components/backbone.py) and runs decode +
resize, then every base with its preprocessing, in batches of ``bottleneck.batch_size``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference import base as beam_inference
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from components import engines, images
from components.backbone import Backbone

# Beam 2.77 imports `resource` together with an optional torch-only module, so
# without torch it loses `resource` too and warns on every batch that memory
# cannot be measured. Give it the standard module back (runs in every worker
# that unpickles this module's handler).
if getattr(beam_inference, "resource", True) is None:
    import resource as _resource

    beam_inference.resource = _resource

# Extractors and forward-pass functions built in this process, by backbone (and engine): the extractor run()
# builds to check the weights is reused by an in-memory runner's handler, and a Dask worker builds one
# function for all the shards it is given.
_EXTRACTORS: dict[Backbone, Any] = {}
_INFER_FUNCTIONS: dict[tuple[Backbone, str], Any] = {}


def extractor_for(backbone: Backbone):
    if backbone not in _EXTRACTORS:
        _EXTRACTORS[backbone] = backbone.extractor()
    return _EXTRACTORS[backbone]


def forget_extractor(backbone: Backbone) -> None:
    """Drop the Keras extractor kept for ``backbone`` (once LiteRT runs it, its weights are in the LiteRT models)."""
    _EXTRACTORS.pop(backbone, None)


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
    """A shard's missing images -> pooled base features: decoded ``batch_size`` at a time, then run by the engine
    (components/engines.py): the LiteRT models (one per base) when given, else the Keras extractor in one
    tf.function.

    RunInference gets it pre-batched (``with_no_batching``): its element is a
    list of ShardWork, so no batch is formed in finish_bundle, which the
    DaskRunner would drop. ``to_compute``: the photos every worker together will compute, when one worker
    does them all (the progress bar's total); None when several share them (each shows its own count).
    """

    def __init__(self, backbone: Backbone, batch_size: int, threads: int = 0, litert_models: list[bytes] | None = None,
                 to_compute: int | None = None):
        super().__init__()
        self._backbone = backbone
        self._batch_size = batch_size
        self._threads = threads
        self._litert_models = litert_models
        self._to_compute = to_compute
        self._bar = None

    @property
    def engine(self) -> str:
        return "litert" if self._litert_models is not None else "tensorflow"

    def load_model(self):
        import tensorflow as tf

        key = (self._backbone, self.engine)
        if key in _INFER_FUNCTIONS:  # the Dask runner sets the DoFn up once per shard
            return _INFER_FUNCTIONS[key]
        if self._threads:
            try:  # a fresh worker process: size its pools so workers x threads <= cores
                tf.config.threading.set_intra_op_parallelism_threads(self._threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._threads)
            except RuntimeError:
                pass  # TensorFlow already running in this process (in-memory mode): keep its pools
        image_size = self._backbone.image_size
        if self._litert_models is not None:
            run = engines.LiteRT(self._litert_models, self._threads)
            decode = tf.function(lambda image_bytes: images.decode_batch(image_bytes, image_size),
                                 input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True)

            def infer(image_bytes: list[bytes]) -> np.ndarray:
                return run(decode(tf.constant(image_bytes)).numpy())
        else:
            extractor = extractor_for(self._backbone)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True)
            def forward(image_bytes):
                return extractor(images.decode_batch(image_bytes, image_size), training=False)

            def infer(image_bytes: list[bytes], _keep=extractor) -> np.ndarray:  # _keep: a tf.function holds
                return forward(tf.constant(image_bytes)).numpy()                  # its variables weakly
        _INFER_FUNCTIONS[key] = infer
        return infer

    def run_inference(self, batch: Sequence[ShardWork], model, inference_args=None) -> Iterable[PredictionResult]:
        bar = self._progress()
        results = []
        for work in batch:
            chunks = []
            for i in range(0, len(work.images), self._batch_size):
                chunks.append(model(work.images[i:i + self._batch_size]))
                bar.update(len(chunks[-1]))
            results.append(PredictionResult(work, np.concatenate(chunks) if chunks else None))
        if bar.total is not None and bar.n >= bar.total:
            bar.close()  # all done: its last figures shown
        return results

    def _progress(self):
        """The bar, started before the first batch so that its rate and time left count from there."""
        if self._bar is None:
            from tqdm import tqdm

            who = "" if self._to_compute is not None else f", pid {os.getpid()}"
            self._bar = tqdm(total=self._to_compute, desc=f"bottleneck: forward passes ({self.engine}{who})",
                             unit="photo", mininterval=1.0)
        return self._bar

    def get_num_bytes(self, batch: Sequence[ShardWork]) -> int:
        return sum(len(b) for work in batch for b in work.images)

    def get_metrics_namespace(self) -> str:
        return "graftline_bottleneck"
