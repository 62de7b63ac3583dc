"""Stage 2, bottleneck: TFRecord shards -> Parquet features of the frozen base (Apache Beam).

One linear pipeline, the same on every runner:

    Create(one work unit per TFRecord shard) -> Reshuffle
      -> ReadShard: parse the shard, take cached features, collect the misses
      -> RunInference(FeatureExtractorHandler, pre-batched per shard)
      -> WritePart: store new features in the cache, write the shard's Parquet part
         under a temporary name, rename it into place, then its small JSON receipt

The stage writes its own parts instead of using Beam's file sinks, and
emits nothing from finish_bundle, because Beam 2.77's DaskRunner drops what
a DoFn emits there (BatchElements' batches, WriteToText's and
WriteToParquet's file results: they come out empty). After the runner
returns, every unit must have its receipt, or the stage fails and publishes
nothing; the output folder appears only once complete (renamed into place,
then ``manifest.json``). The counts in the report come from the receipts,
since the DaskRunner has no metrics.

The model handler (components/beam_inference.py) sets the engine up once per worker process
(``bottleneck.engine``, components/engines.py: on a CPU the backbone of components/backbone.py
converted to LiteRT here, once; TensorFlow's tf.function otherwise) and decodes + resizes
``bottleneck.batch_size`` photos at a time for it. Features are cached per image under the backbone's
fingerprint of everything that determines them (bases, alpha, weights files' hashes, image size,
preprocessing, decode, engine), so a re-run after adding k photos
makes k forward passes; any change to those inputs starts a new, empty
fingerprint folder.

Shards, parts and the cache go through Beam's FileSystems, so a cluster
can use gs:// or s3:// locations; local paths are made absolute, because a
Dask worker's working folder is not the client's. ``bottleneck.runner``
DirectRunner runs here in one process or ``bottleneck.workers`` processes;
``dask`` runs on a Dask cluster (``bottleneck.dask_address``, or a local
one with ``bottleneck.workers`` processes); any other name goes to Beam with
``bottleneck.beam_options`` unchanged (Flink, Spark, Dataflow); the runner's flags and a local
Dask cluster's lifecycle are components/beam_runners.py's, where parts land components/publishing.py's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from components import engines, features, records
from components.backbone import Backbone
from components.beam_inference import FeatureExtractorHandler, ShardWork, extractor_for, forget_extractor
from components.atomic import write_json
from components.beam_runners import beam_flags, dask_scheduler, is_dask, pipeline_runner, run_to_completion
from components.publishing import absolute, published
from components.vector_cache import VectorCache, written
from components.errors import GraftlineError

MANIFEST = "manifest.json"
RECEIPT_SUFFIX = ".receipt.json"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"



class ReadShard(beam.DoFn):
    """(split, shard URL, part name) -> [ShardWork]: the shard's rows, cached features and misses."""

    def __init__(self, cache: VectorCache | None):
        self._cache = cache

    def process(self, unit):
        split, shard, part = unit
        work = ShardWork(split, part, [], [], [], {}, [], [], 0)
        for index, record in enumerate(records.read_shard(shard)):
            sha = hashlib.sha256(record.image).hexdigest()
            work.keys.append(record.key)
            work.labels.append(record.label)
            work.sha256s.append(sha)
            vector, rejected = self._cache.get(sha) if self._cache else (None, False)
            work.rejected += rejected
            if vector is None:
                work.missing.append(index)
                work.images.append(record.image)
            else:
                work.cached[index] = vector
        yield [work]  # pre-batched for RunInference


class WritePart(beam.DoFn):
    """A shard's features -> cache entries, its Parquet part and its receipt, each renamed into place."""

    def __init__(self, cache: VectorCache | None, folder: str, width: int):
        self._cache, self._folder, self._width = cache, folder, width

    def process(self, result: PredictionResult):
        work, computed = result.example, result.inference
        vectors = dict(work.cached)
        for index, vector in zip(work.missing, computed if computed is not None else []):
            vectors[index] = vector
            if self._cache is not None:
                self._cache.put(work.sha256s[index], vector)
        rows = [(work.keys[i], work.labels[i], work.split, vectors[i]) for i in range(len(work.keys))]
        path = FileSystems.join(self._folder, work.part)
        with written(path) as handle:
            features.write(features.table(rows, self._width), handle)
        receipt = {"part": work.part, "split": work.split, "rows": len(rows), "forward_passes": len(work.missing),
                   "cache_hits": len(work.cached), "cache_rejected": work.rejected, "worker": worker_name()}
        with written(path + RECEIPT_SUFFIX) as handle:
            handle.write(json.dumps(receipt).encode())
        engines.release_freed_memory()  # the shard's freed pages back to the OS before the next shard is read
        yield receipt


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples. outputs: bottlenecks (folder of Parquet parts and manifest.json), report (JSON)."""
    started = time.time()
    base, p = params.base, params.bottleneck
    # 1. One work unit per TFRecord shard.
    examples = absolute(str(inputs["examples"]))
    shards = {split: records.shard_urls(examples, split) for split in records.SPLITS}
    missing = [s for s in records.SPLITS if not shards[s]]
    if missing:
        raise GraftlineError(f"{examples} has no TFRecord shards for {', '.join(missing)}; run ingest first")
    units = [(split, url, records.part_name(url)) for split in records.SPLITS for url in shards[split]]

    # 2. The backbone, built here once so that a bad weights file fails now with one line, not inside a
    #    Beam worker; its feature width; the engine that runs it and its feature cache (off for random
    #    weights: no file to name it by); LiteRT's models, converted here once when there is work for them.
    backbone = Backbone.from_params(params, training=False)
    width = int(extractor_for(backbone).output_shape[-1])
    engine = _engine(backbone, p.engine)
    # One process computes every photo (the default): its progress bar gets the total.
    in_memory = p.runner == "DirectRunner" and p.workers == 1
    cache, to_compute = _cache(p, backbone, engine, width, shards, in_memory)
    litert_models, convert_s = None, None
    if engine == "litert" and to_compute != 0:
        litert_models, convert_s = engines.litert_or_fallback(
            p.engine, "bottleneck", base.model, lambda: engines.backbone_to_litert(backbone, extractor_for(backbone)))
        if litert_models is None:  # auto, and LiteRT cannot convert it
            engine = "tensorflow"
            cache, to_compute = _cache(p, backbone, engine, width, shards, in_memory)
        else:  # the Keras extractor is not run again: its memory goes back for the forward passes
            forget_extractor(backbone)
            engines.release_freed_memory()
    # 3. The model handler, with threads shared out among local worker processes.
    dask = is_dask(p.runner)
    # Local workers share this machine's cores; a remote cluster's machines size their own pools.
    local_workers = p.workers if p.runner == "DirectRunner" or (dask and not p.dask_address) else 0
    threads = max(1, (os.cpu_count() or 1) // local_workers) if local_workers else 0
    handler = FeatureExtractorHandler(backbone, p.batch_size, threads, litert_models, to_compute)
    # 4. Run the pipeline on the runner; every shard's receipt, then the manifest; publish.
    out = str(outputs["bottlenecks"])
    with published(out) as folder, (dask_scheduler(p) if dask else contextlib.nullcontext("")) as address:
        flags = beam_flags(p, len(units), address)
        options = PipelineOptions(flags)
        pipeline = beam.Pipeline(runner=pipeline_runner(p, options), options=options)
        _ = (pipeline
             | "Shards" >> beam.Create(units)
             | "Spread" >> beam.Reshuffle()  # one shard per worker at a time, on every runner
             | "Read shard" >> beam.ParDo(ReadShard(cache))
             | "Features" >> RunInference(handler.with_no_batching())  # one model load per worker
             | "Write part" >> beam.ParDo(WritePart(cache, folder, width)))
        run_to_completion(pipeline, p, address, out)
        receipts = _collect_receipts(folder, units, p.runner, out)
        manifest = {"feature_width": width, "parts": [
            {k: r[k] for k in ("part", "split", "rows")} for r in receipts]}
        with written(FileSystems.join(folder, MANIFEST)) as handle:
            handle.write(json.dumps(manifest, indent=2).encode())

    # 5. The report, from the receipts (the DaskRunner has no metrics).
    passes_by_worker: dict[str, int] = {}
    for r in receipts:
        passes_by_worker[r["worker"]] = passes_by_worker.get(r["worker"], 0) + r["forward_passes"]
    report = {
        "base": {"model": base.model, "alpha": base.alpha, "image_size": base.image_size,
                 "weights": [b.weights or "none" for b in backbone.bases]},
        "feature_width": width,
        "rows": {s: sum(r["rows"] for r in receipts if r["split"] == s) for s in records.SPLITS},
        "parts": len(receipts),
        "forward_passes": sum(r["forward_passes"] for r in receipts),
        "cache": {"folder": cache.folder if cache else None, "hits": sum(r["cache_hits"] for r in receipts),
                  "unreadable_entries_recomputed": sum(r["cache_rejected"] for r in receipts)},
        "runner": p.runner,
        "beam_flags": [f for f in flags if not f.startswith("--dask_client_address")],
        "dask_scheduler": ("bottleneck.dask_address" if p.dask_address else "local cluster") if dask else None,
        "workers": p.workers,
        # Who ran the forward passes: the receipts' host:pid (several processes = the work was spread).
        "forward_passes_by_worker": passes_by_worker,
        "threads_per_worker": threads,
        "engine": {"setting": p.engine, "ran": engine, "conversion_s": convert_s},
        "batch_size": p.batch_size,
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(Path(outputs["report"]), report)
    return report


def _engine(backbone: Backbone, setting: str) -> str:
    """The engine ``bottleneck.engine`` names here. ``auto`` keeps random weights on TensorFlow, whose
    features later stages recompute with it."""
    engine = engines.resolve(setting)
    return "tensorflow" if setting == "auto" and not backbone.cacheable else engine


def _cache(p, backbone: Backbone, engine: str, width: int, shards: dict, in_memory: bool
           ) -> tuple[VectorCache | None, int | None]:
    """The engine's feature cache, and the photos to compute when one process computes them all."""
    cache = (VectorCache(absolute(p.cache_dir), backbone.fingerprint(engine), (width,))
             if p.cache_dir and backbone.cacheable else None)
    return cache, _to_compute(shards, cache) if in_memory else None


def _to_compute(shards: dict, cache: VectorCache | None) -> int:
    """Photos the run will pass through the network: every one, cache hits apart (the progress bar's total)."""
    return sum(cache is None or cache.get(hashlib.sha256(record.image).hexdigest())[0] is None
               for urls in shards.values() for url in urls for record in records.read_shard(url))


def _collect_receipts(folder: str, units: list, runner: str, out: str) -> list[dict]:
    """Every shard's receipt, in unit order; a missing one fails the stage (the runner lost work)."""
    receipts = []
    for split, shard, part in units:
        try:
            with FileSystems.open(FileSystems.join(folder, part + RECEIPT_SUFFIX),
                                  compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                receipts.append(json.loads(handle.read()))
        except (OSError, BeamIOError):
            raise GraftlineError(
                f"bottleneck: the {runner} run finished but wrote no part for {shard}; nothing was written "
                f"to {out}. This runner lost work: run it with bottleneck.runner: DirectRunner to compare, "
                "and report it") from None
    FileSystems.delete([FileSystems.join(folder, part + RECEIPT_SUFFIX) for _, _, part in units])
    # Temporary files of tasks that died mid-write (a killed worker) or ran twice: not output.
    leftovers = [m.path for m in FileSystems.match([FileSystems.join(folder, "*.tmp-*")])[0].metadata_list]
    if leftovers:
        FileSystems.delete(leftovers)
    return receipts
