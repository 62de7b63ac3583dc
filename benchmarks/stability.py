"""How far figures move when a photo's features are computed in another batch.

    .venv/bin/python benchmarks/stability.py --folder ../shared/data/flowers \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/stability.py ...   # as on a CPU without AVX-512

Extracts every photo's features three ways on this machine: as the bottleneck
stage does on a first run (batches of bottleneck.batch_size in shard order), in
the reverse order (other neighbours, other positions), and one photo at a time
(what a re-run that recomputes a few photos comes closest to). Prints the
largest feature difference, then trains the head with the default recipe on
each and prints its metrics side by side: what a recomputed cache can move
downstream.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def extract(extractor, image_size: int, data: list[bytes], order: list[int], batch: int):
    import numpy as np
    import tensorflow as tf

    from components import images

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def infer(b):
        return extractor(images.decode_batch(b, image_size), training=False)

    out = {}
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        for j, v in zip(chunk, infer(tf.constant([data[j] for j in chunk])).numpy()):
            out[j] = v
    return np.stack([out[j] for j in range(len(data))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="photos in class folders (data.source)")
    parser.add_argument("--weights", required=True, help="base.weights file")
    args = parser.parse_args()

    import numpy as np

    from components import features, records
    from components.backbone import Backbone
    from components.stages import ingest, train_head
    from machine import cpu
    from pipeline import params as params_mod
    from pipeline import runtime

    p = params_mod.from_dict({"data": {"source": str(Path(args.folder).resolve()), "sha256": ""},
                              "base": {"model": "mobilenet_v2", "weights": str(Path(args.weights).resolve())}})
    runtime.configure(p.seed)
    with tempfile.TemporaryDirectory(prefix="graftline-stability-") as work:
        work = Path(work)
        ingest.run(p, {"downloads": work / "download", "extract_dir": work / "raw"},
                   {"examples": work / "examples", "labels": work / "labels.json", "report": work / "ingest.json"})
        recs = {s: [r for shard in records.shard_paths(work / "examples", s) for r in records.read_shard(str(shard))]
                for s in records.SPLITS}
        everything = [r for s in records.SPLITS for r in recs[s]]
        data = [r.image for r in everything]
        b = p.base
        extractor = Backbone.from_params(p, training=False).extractor()
        n, batch = len(data), p.bottleneck.batch_size
        ways = {"first run (batches of %d)" % batch: extract(extractor, b.image_size, data, list(range(n)), batch),
                "reverse order": extract(extractor, b.image_size, data, list(range(n))[::-1], batch),
                "one photo at a time": extract(extractor, b.image_size, data, list(range(n)), 1)}
        first = next(iter(ways.values()))
        print(f"machine: {cpu()}")
        print(f"data: {args.folder}, {n} photos; MobileNetV2 {b.alpha} at {b.image_size} px\n")
        print("| features | largest difference to the first run | photos bit-equal |")
        print("|---|---:|---:|")
        for name, feats in ways.items():
            print(f"| {name} | {np.abs(feats - first).max():.2g} | {np.mean(np.all(feats == first, axis=1)):.0%} |")
        print(f"\n(graftline states features.RECOMPUTED_ATOL = {features.RECOMPUTED_ATOL:g})\n")
        print("| head trained on | val_accuracy | val_loss | best_epoch | epochs_run |")
        print("|---|---:|---:|---:|---:|")
        for name, feats in ways.items():
            offset, out = 0, work / name.replace(" ", "_")
            for split in records.SPLITS:
                rows = [(r.key, r.label, split, feats[offset + i]) for i, r in enumerate(recs[split])]
                offset += len(rows)
                (out / "bottlenecks").mkdir(parents=True, exist_ok=True)
                with open(out / "bottlenecks" / f"{split}-00000-of-00001.parquet", "wb") as handle:
                    features.write(features.table(rows, feats.shape[1]), handle)
            runtime.configure(p.seed)
            with contextlib.redirect_stdout(io.StringIO()):  # Keras' epoch lines
                m = train_head.run(p, {"bottlenecks": out / "bottlenecks", "labels": work / "labels.json"},
                                   {"head": out / "head", "metrics": out / "m.json", "plots": out / "p.csv",
                                    "report": out / "r.json"})
            print(f"| {name} | {m['val_accuracy']:.6f} | {m['val_loss']:.6f} | {m['best_epoch']} | {m['epochs_run']} |")


if __name__ == "__main__":
    main()
