"""Stage 2, bottleneck: TFRecord shards -> Parquet features of the frozen base (Apache Beam).

ReadFromTFRecord -> RunInference(KeyedModelHandler(FeatureExtractorHandler))
-> Partition by split -> WriteToParquet. The handler loads the base once per
worker, batches with Beam's BatchElements at a fixed size, and runs
decode + resize + preprocessing + base inside one ``tf.function``. Rows are
keyed by (key, label, split) so features stay joined to their labels.

``bottleneck.runner`` and ``bottleneck.beam_options`` go to Beam unchanged,
so the same stage runs on the DirectRunner here and on Flink, Spark or
Dataflow elsewhere.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from components import base_models, features, images, records
from components.atomic import atomic_dir, write_json
from components.errors import GraftlineError

COUNTER_NAMESPACE = "graftline"
FORWARD_PASSES = "forward_passes"


class FeatureExtractorHandler(ModelHandler[bytes, PredictionResult, Any]):
    """Encoded image bytes -> pooled base features, batched, in one tf.function."""

    def __init__(self, model: str, alpha: float, image_size: int, weights_path: str | None, batch_size: int):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._spec = (model, alpha, image_size, weights_path)
        self._bar = None
        self._passes = Metrics.counter(COUNTER_NAMESPACE, FORWARD_PASSES)

    def load_model(self):
        import tensorflow as tf

        model, alpha, image_size, weights_path = self._spec
        extractor = base_models.build_feature_extractor(model, alpha, image_size, weights_path)

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
            self._bar = tqdm(desc=f"bottleneck (pid {os.getpid()})", unit="img")
        self._bar.update(n)

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(b) for b in batch)

    def get_metrics_namespace(self) -> str:
        return "graftline_bottleneck"


def _keyed(split: str):
    def keyed(serialized: bytes):
        record = records.from_example(serialized)
        return (record.key, record.label, split), record.image

    return keyed


def _row(keyed_result) -> dict:
    (key, label, split), result = keyed_result
    return features.row(key, label, split, result.inference)


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples. outputs: bottlenecks (folder of Parquet), report (JSON)."""
    started = time.time()
    base = params.base
    examples_dir = Path(inputs["examples"])
    missing = [s for s in records.SPLITS if not records.shard_paths(examples_dir, s)]
    if missing:
        raise GraftlineError(f"{examples_dir} has no TFRecord shards for {', '.join(missing)}; run ingest first")

    weights_path = base_models.resolve_weights(base.model, base.alpha, base.image_size, base.weights)
    # Built once here so that a bad weights file fails now with one line, not inside a Beam worker.
    extractor = base_models.build_feature_extractor(base.model, base.alpha, base.image_size, weights_path)
    width = int(extractor.output_shape[-1])
    del extractor

    options = PipelineOptions([f"--runner={params.bottleneck.runner}", *params.bottleneck.beam_options])
    handler = FeatureExtractorHandler(base.model, base.alpha, base.image_size, weights_path,
                                      params.bottleneck.batch_size)
    out_dir = Path(outputs["bottlenecks"])
    with atomic_dir(out_dir) as tmp:
        pipeline = beam.Pipeline(options=options)
        keyed = [
            pipeline
            | f"Read {split}" >> beam.io.ReadFromTFRecord(
                str(examples_dir / f"{split}-*.tfrecord.gz"), compression_type=CompressionTypes.GZIP)
            | f"Key {split}" >> beam.Map(_keyed(split))
            for split in records.SPLITS
        ]
        rows = (
            keyed
            | "All splits" >> beam.Flatten()
            | "Features" >> RunInference(KeyedModelHandler(handler))  # one model load per worker
            | "Rows" >> beam.Map(_row)
            | "By split" >> beam.Partition(lambda row, n: records.SPLITS.index(row[features.SPLIT]), len(records.SPLITS))
        )
        for split, split_rows in zip(records.SPLITS, rows):
            _ = split_rows | f"Write {split}" >> beam.io.WriteToParquet(
                str(tmp / split), features.schema(width), file_name_suffix=".parquet")
        result = pipeline.run()
        result.wait_until_finish()
        counters = result.metrics().query(MetricsFilter().with_name(FORWARD_PASSES))["counters"]
        forward_passes = sum(c.committed or c.attempted or 0 for c in counters)

    report = {
        "base": {"model": base.model, "alpha": base.alpha, "image_size": base.image_size,
                 "weights": weights_path or "none"},
        "feature_width": width,
        "rows": {s: features.count_rows(out_dir, s) for s in records.SPLITS},
        "forward_passes": forward_passes,
        "runner": params.bottleneck.runner,
        "beam_options": list(params.bottleneck.beam_options),
        "batch_size": params.bottleneck.batch_size,
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(Path(outputs["report"]), report)
    return report
