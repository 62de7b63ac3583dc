"""Bottleneck throughput five ways: a plain batched tf.function loop; the Beam stage on the
DirectRunner in-memory and multi-process (2 workers); the Beam stage on the DaskRunner with a
local cluster of 1 and 2 worker processes. Prints images/s, the ratio to the plain loop and peak memory.

    .venv/bin/python benchmarks/bottleneck.py --folder ../shared/data/flowers \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
    .venv/bin/python benchmarks/bottleneck.py --draw 2000 --weights ...   # drawn 320x240 photos
    .venv/bin/python benchmarks/bottleneck.py --draw 2000 --shard-size 100 --weights ...

Each way runs in its own process (so peak RSS is its own) on the same TFRecords,
made once by the ingest stage; times cover model loading and all of the
extraction, as a user waits for it (for Dask: starting and closing the local
cluster too). The feature cache is off. Dask spreads shards, so --shard-size
sets how many tasks there are.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# way -> (bottleneck.runner, bottleneck.workers)
WAYS = {"plain": ("DirectRunner", 1), "in-memory": ("DirectRunner", 1), "multi-process": ("DirectRunner", 2),
        "dask 1 worker": ("dask", 1), "dask 2 workers": ("dask", 2)}


def params_for(weights: str, size: int, way: str, batch: int):
    from pipeline import params

    runner, workers = WAYS[way]
    return params.from_dict({
        "data": {"source": "unused", "sha256": ""},
        "base": {"model": "mobilenet_v2", "weights": weights, "image_size": size},
        "bottleneck": {"runner": runner, "workers": workers, "cache_dir": "", "batch_size": batch},
    })


def plain_loop(examples: Path, p) -> int:
    """The baseline: tf.data over the shards, batches of bytes into one tf.function."""
    import tensorflow as tf

    from components import images, records
    from components.backbone import Backbone

    b = p.base
    extractor = Backbone.from_params(p, training=False).extractor()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def infer(image_bytes):
        return extractor(images.decode_batch(image_bytes, b.image_size), training=False)

    n = 0
    for split in records.SPLITS:
        for batch in records.dataset(examples, split).map(lambda ex: ex[records.IMAGE]).batch(p.bottleneck.batch_size):
            n += int(infer(batch).shape[0])
    return n


def stage(examples: Path, p, out: Path) -> int:
    from components.stages import bottleneck

    report = bottleneck.run(p, {"examples": examples}, {"bottlenecks": out / "bottlenecks", "report": out / "r.json"})
    return report["forward_passes"]


def one_way(args) -> None:
    """Child process: time one way, print a JSON line."""
    p = params_for(args.weights, args.size, args.way, args.batch)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        n = plain_loop(Path(args.examples), p) if args.way == "plain" else stage(Path(args.examples), p, Path(out))
    seconds = time.perf_counter() - started
    print(json.dumps({
        "way": args.way, "images": n, "seconds": seconds,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def draw_folder(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"class{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        x = np.linspace(0, 1, 320)[None, :, None] * rng.integers(40, 255, 3)
        y = np.linspace(0, 1, 240)[:, None, None] * rng.integers(40, 255, 3)
        image = (x + y) / 2 + rng.normal(0, 20, (240, 320, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="photos in class folders")
    parser.add_argument("--draw", type=int, help="draw this many 320x240 photos instead")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per way; the best is reported")
    parser.add_argument("--shard-size", type=int, default=1000, help="photos per TFRecord shard (data.shard_size)")
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--examples", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        return one_way(args)
    if not (args.folder or args.draw):
        parser.error("give --folder or --draw")

    from components.stages import ingest
    from pipeline import params

    with tempfile.TemporaryDirectory(prefix="graftline-bench-") as work:
        work = Path(work)
        source = Path(args.folder) if args.folder else work / "drawn"
        if args.draw:
            draw_folder(source, args.draw)
        p = params.from_dict({"data": {"source": str(source.resolve()), "sha256": "", "shard_size": args.shard_size}})
        examples = work / "examples"
        ingest.run(p, {"downloads": work / "download", "extract_dir": work / "raw"}, {"examples": examples, "labels": work / "labels.json",
                                                       "report": work / "ingest.json"})
        results = {}
        for _ in range(args.repeats):
            for way in WAYS:
                cmd = [sys.executable, __file__, "--way", way, "--examples", str(examples), "--weights",
                       args.weights, "--size", str(args.size), "--batch", str(args.batch)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{way} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if way not in results or r["seconds"] < results[way]["seconds"]:
                    results[way] = r
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print(f"machine: {os.cpu_count()} cores ({cpu}); data: {args.folder or f'{args.draw} drawn 320x240 JPEGs'}; "
          f"MobileNetV2 1.0 at {args.size} px, batch {args.batch}, shards of {args.shard_size}; best of {args.repeats}\n")
    print("| way | images | seconds | images/s | ratio to plain loop | peak RSS main (MiB) | peak RSS worker (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    plain = results["plain"]["images"] / results["plain"]["seconds"]
    for way, r in results.items():
        rate = r["images"] / r["seconds"]
        worker = f"{r['worker_rss_mib']:.0f}" if way not in ("plain", "in-memory") else "-"  # largest child
        print(f"| {way} | {r['images']} | {r['seconds']:.1f} | {rate:.0f} | {rate / plain:.2f} | {r['rss_mib']:.0f} | {worker} |")


if __name__ == "__main__":
    main()
