"""Stage 2, bottleneck: TFRecord shards -> Parquet features of the frozen base (Apache Beam).

    ReadFromTFRecord (per split) -> key by (key, label, split, sha256)
      -> feature cache lookup --hit-------------------------------------------+
                              --miss-> RunInference(KeyedModelHandler) -> store -+-> rows
      -> Partition by split -> WriteToParquet (explicit pyarrow schema)

The model handler loads the base once per worker, batches at a fixed size
with Beam's BatchElements and runs decode + resize + preprocessing + base in
one ``tf.function``. Features are cached per image under a fingerprint of
everything that determines them (base, alpha, weights file hash, image size,
preprocessing, decode), so a re-run after adding k photos makes k forward
passes; any change to those inputs starts a new, empty fingerprint folder.

``bottleneck.runner`` and ``bottleneck.beam_options`` go to Beam unchanged,
so the same stage runs on the DirectRunner here and on Flink, Spark or
Dataflow elsewhere; ``bottleneck.workers`` sets the DirectRunner's process
count, and TensorFlow's thread pools are sized so workers x threads <= cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference import base as beam_inference
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from components import base_models, features, images, records
from components.atomic import atomic_dir, write_json
from components.download import sha256_of
from components.errors import GraftlineError

# Beam 2.77 imports `resource` together with an optional torch-only module, so
# without torch it loses `resource` too and warns on every batch that memory
# cannot be measured. Give it the standard module back (runs in every worker
# that unpickles this module's handler).
if getattr(beam_inference, "resource", True) is None:
    import resource as _resource

    beam_inference.resource = _resource

COUNTER_NAMESPACE = "graftline"
# Extractors built in this process, by (model, alpha, image_size, weights): the one
# run() builds to check the weights is reused by an in-memory runner's handler.
_EXTRACTORS: dict[tuple, Any] = {}


def extractor_for(model: str, alpha: float, image_size: int, weights_path: str | None, feature_layer: str = "",
                  upsample: int = 1):
    # The input block's noise is off at inference, so it does not change features.
    key = (model, alpha, image_size, weights_path, feature_layer, 0.0, upsample)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = base_models.build_feature_extractor(*key)
    return _EXTRACTORS[key]
FORWARD_PASSES = "forward_passes"
CACHE_HITS = "cache_hits"
CACHE_REJECTED = "cache_rejected"


class FeatureExtractorHandler(ModelHandler[bytes, PredictionResult, Any]):
    """Encoded image bytes -> pooled base features, batched, in one tf.function."""

    def __init__(self, model: str, alpha: float, image_size: int, weights_path: str | None,
                 feature_layer: str, upsample: int, batch_size: int, tf_threads: int = 0):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._spec = (model, alpha, image_size, weights_path, feature_layer, upsample)
        self._tf_threads = tf_threads
        self._bar = None
        self._passes = Metrics.counter(COUNTER_NAMESPACE, FORWARD_PASSES)

    def load_model(self):
        import tensorflow as tf

        if self._tf_threads:
            try:  # a fresh worker process: size its pools so workers x threads <= cores
                tf.config.threading.set_intra_op_parallelism_threads(self._tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._tf_threads)
            except RuntimeError:
                pass  # TensorFlow already running in this process (in-memory mode): keep its pools
        extractor = extractor_for(*self._spec)
        image_size = self._spec[2]

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True)
        def infer(image_bytes):
            return extractor(images.decode_batch(image_bytes, image_size), training=False)

        infer.extractor = extractor  # keep the Keras model alive with its function
        return infer

    def run_inference(self, batch: Sequence[bytes], model, inference_args=None) -> Iterable[PredictionResult]:
        import tensorflow as tf

        outputs = model(tf.constant(list(batch))).numpy()
        self._passes.inc(len(batch))
        self._progress(len(batch))
        return [PredictionResult(None, vector) for vector in outputs]

    def _progress(self, n: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(desc=f"bottleneck: forward passes (pid {os.getpid()})", unit="img")
        self._bar.update(n)

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(b) for b in batch)

    def get_metrics_namespace(self) -> str:
        return "graftline_bottleneck"


class FeatureCache:
    """Per-image features under ``root/fingerprint/ab/<sha256>.f32`` (any Beam filesystem).

    An entry is the float32 vector followed by its CRC32, written under a
    temporary name and renamed into place; an entry of the wrong length or
    checksum (a torn write, a bad disk) is reported as a miss and rewritten.
    """

    def __init__(self, root: str, fingerprint: str, width: int):
        self.folder = FileSystems.join(root, fingerprint)
        self.width = width

    def path(self, sha256: str) -> str:
        return FileSystems.join(self.folder, sha256[:2], sha256 + ".f32")

    def get(self, sha256: str) -> tuple[np.ndarray | None, bool]:
        """(vector or None, whether an entry existed but was unreadable)."""
        path = self.path(sha256)
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
        except (OSError, BeamIOError):
            return None, False
        body, crc = data[:-4], data[-4:]
        if len(body) != 4 * self.width or zlib.crc32(body).to_bytes(4, "little") != crc:
            return None, True
        return np.frombuffer(body, np.float32), False

    def put(self, sha256: str, vector: np.ndarray) -> None:
        body = np.asarray(vector, np.float32).tobytes()
        final = self.path(sha256)
        tmp = f"{final}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(body + zlib.crc32(body).to_bytes(4, "little"))
        FileSystems.rename([tmp], [final])


class LookUpCache(beam.DoFn):
    """Cached features go out on the main output; misses go to 'miss' for inference."""

    def __init__(self, cache: FeatureCache | None):
        self._cache = cache
        self._hits = Metrics.counter(COUNTER_NAMESPACE, CACHE_HITS)
        self._rejected = Metrics.counter(COUNTER_NAMESPACE, CACHE_REJECTED)

    def process(self, element):
        keys, image = element
        if self._cache is not None:
            vector, rejected = self._cache.get(keys[3])
            if rejected:
                self._rejected.inc()
            if vector is not None:
                self._hits.inc()
                yield keys, vector
                return
        yield beam.pvalue.TaggedOutput("miss", element)


class StoreInCache(beam.DoFn):
    def __init__(self, cache: FeatureCache | None):
        self._cache = cache

    def process(self, keyed_result):
        keys, result = keyed_result
        vector = np.asarray(result.inference, np.float32)
        if self._cache is not None:
            self._cache.put(keys[3], vector)
        yield keys, vector


def _keyed(split: str):
    def keyed(serialized: bytes):
        record = records.from_example(serialized)
        sha = hashlib.sha256(record.image).hexdigest()  # of the bytes the network sees
        return (record.key, record.label, split, sha), record.image

    return keyed


def _row(keyed_vector) -> tuple:
    (key, label, split, _), vector = keyed_vector
    return key, label, split, vector


def fingerprint(base, upsample: int, weights_path: str) -> str:
    """Everything that determines an image's features, hashed: the cache folder's name."""
    spec = {
        "model": base.model, "alpha": base.alpha, "image_size": base.image_size,
        "weights_sha256": sha256_of(Path(weights_path)),
        "feature_layer": base.feature_layer,
        "upsample": upsample,
        "preprocessing": base_models.preprocessing_of(base.model),
        "decode": images.DECODE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def beam_flags(p) -> list[str]:
    """The runner, the DirectRunner's process count from bottleneck.workers, then the user's flags."""
    flags = [f"--runner={p.runner}"]
    given = " ".join(p.beam_options)
    if p.runner == "DirectRunner" and p.workers > 1 and "direct_running_mode" not in given:
        flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={p.workers}"]
    return flags + list(p.beam_options)


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples. outputs: bottlenecks (folder of Parquet), report (JSON)."""
    started = time.time()
    base, p = params.base, params.bottleneck
    examples_dir = Path(inputs["examples"])
    missing = [s for s in records.SPLITS if not records.shard_paths(examples_dir, s)]
    if missing:
        raise GraftlineError(f"{examples_dir} has no TFRecord shards for {', '.join(missing)}; run ingest first")

    weights_path = base_models.resolve_weights(base.model, base.alpha, base.image_size, base.weights)
    # Built here so that a bad weights file fails now with one line, not inside a Beam worker.
    upsample = params.input_block.upsample
    width = int(extractor_for(base.model, base.alpha, base.image_size, weights_path,
                              base.feature_layer, upsample).output_shape[-1])

    # Random weights differ with the seed: caching them would serve another run's features.
    cache = FeatureCache(p.cache_dir, fingerprint(base, upsample, weights_path), width) if p.cache_dir and weights_path else None
    tf_threads = max(1, (os.cpu_count() or 1) // max(1, p.workers))
    handler = FeatureExtractorHandler(base.model, base.alpha, base.image_size, weights_path, base.feature_layer,
                                      upsample, p.batch_size, tf_threads)
    out_dir = Path(outputs["bottlenecks"])
    with atomic_dir(out_dir) as tmp:
        pipeline = beam.Pipeline(options=PipelineOptions(beam_flags(p)))
        keyed = [
            pipeline
            | f"Read {split}" >> beam.io.ReadFromTFRecord(
                str(examples_dir / f"{split}-*.tfrecord.gz"), compression_type=CompressionTypes.GZIP)
            | f"Key {split}" >> beam.Map(_keyed(split))
            for split in records.SPLITS
        ]
        looked_up = (keyed | "All splits" >> beam.Flatten()
                     | "Look up cache" >> beam.ParDo(LookUpCache(cache)).with_outputs("miss", main="hit"))
        computed = (looked_up.miss
                    | "Features" >> RunInference(KeyedModelHandler(handler))  # one model load per worker
                    | "Store in cache" >> beam.ParDo(StoreInCache(cache)))
        by_split = ((looked_up.hit, computed) | "Hits and computed" >> beam.Flatten()
                    | "Rows" >> beam.Map(_row)
                    | "By split" >> beam.Partition(lambda row, n: records.SPLITS.index(row[2]), len(records.SPLITS)))
        for split, split_rows in zip(records.SPLITS, by_split):
            _ = (split_rows
                 # Arrow tables of many rows: per-row dicts of Python floats cost more than the model.
                 | f"Batch {split}" >> beam.BatchElements(min_batch_size=256, max_batch_size=2048)
                 | f"Table {split}" >> beam.Map(features.table, width)
                 | f"Write {split}" >> beam.io.WriteToParquetBatched(
                     str(tmp / split), features.schema(width), file_name_suffix=".parquet"))
        result = pipeline.run()
        result.wait_until_finish()
        counters = {}
        for c in result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))["counters"]:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)

    report = {
        "base": {"model": base.model, "alpha": base.alpha, "image_size": base.image_size,
                 "weights": weights_path or "none"},
        "feature_width": width,
        "rows": {s: features.count_rows(out_dir, s) for s in records.SPLITS},
        "forward_passes": counters.get(FORWARD_PASSES, 0),
        "cache": {"folder": cache.folder if cache else None, "hits": counters.get(CACHE_HITS, 0),
                  "unreadable_entries_recomputed": counters.get(CACHE_REJECTED, 0)},
        "runner": p.runner,
        "beam_flags": beam_flags(p),
        "workers": p.workers,
        "tf_threads_per_worker": tf_threads,
        "batch_size": p.batch_size,
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(Path(outputs["report"]), report)
    return report
