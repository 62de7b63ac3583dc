"""Wall time of each pipeline stage, run as a user runs it (`graftline <stage>` processes).

    .venv/bin/python benchmarks/stages.py --source ../shared/data/flowers \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Copies params.yaml into a temporary folder with data.source / base.weights
set (every other param at its default unless --set key=value), runs the five
stages in order and prints a Markdown table: process wall time (TensorFlow's
import included), the stage's own time from its report, and its headline
figure. Prints the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402
STAGES = (
    ("ingest", "reports/ingest.json", lambda r: f"{r['num_examples']} photos, splits {r['splits']}"),
    ("bottleneck", "reports/bottleneck.json", lambda r: f"{r['forward_passes']} forward passes"),
    ("train-head", "metrics/train_head.json", lambda m: f"val_accuracy {m['val_accuracy']:.3f} ({m['epochs_run']} epochs)"),
    ("fine-tune", "metrics/fine_tune.json",
     lambda m: f"val_accuracy {m['val_accuracy']:.3f} ({m['epochs_run']} of up to {m['epochs']} epochs)"),
    ("evaluate", "metrics/evaluate.json", lambda m: f"test accuracy {m['accuracy']:.3f} on {m['num_test']} photos"),
)
REPORTS = {"train-head": "reports/train_head.json", "fine-tune": "reports/fine_tune.json",
           "evaluate": "reports/evaluate.json"}


def set_key(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        params = params.setdefault(key, {})
    params[last] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder of class folders (data.source)")
    parser.add_argument("--weights", default="imagenet", help="base.weights (a file path works offline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other params (YAML values)")
    args = parser.parse_args()

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    set_key(params, "data.source", str(Path(args.source).resolve()))
    set_key(params, "data.sha256", "")
    set_key(params, "base.weights", str(Path(args.weights).resolve()) if args.weights not in ("imagenet", "none") else args.weights)
    for item in args.set:
        key, value = item.split("=", 1)
        set_key(params, key, yaml.safe_load(value))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="graftline-bench-") as work:
        (Path(work) / "params.yaml").write_text(yaml.safe_dump(params))
        for stage, output, headline in STAGES:
            started = time.time()
            result = subprocess.run(["graftline", stage], cwd=work, env=env, capture_output=True, text=True)
            wall = time.time() - started
            if result.returncode:
                sys.exit(f"graftline {stage} failed:\n{result.stderr[-3000:]}")
            data = json.loads((Path(work) / output).read_text())
            report = json.loads((Path(work) / REPORTS.get(stage, output)).read_text())
            rows.append((stage, wall, report["wall_time_s"], headline(data)))
    print(f"machine: {describe()}")
    print(f"data: {args.source}; params: defaults" + (f" with {', '.join(args.set)}" if args.set else ""))
    print()
    print("| stage | process wall time (s) | in-stage time (s) | result |")
    print("|---|---:|---:|---|")
    for stage, wall, inner, text in rows:
        print(f"| {stage} | {wall:.1f} | {inner:.1f} | {text} |")
    print(f"| total | {sum(r[1] for r in rows):.1f} | {sum(r[2] for r in rows):.1f} | |")


if __name__ == "__main__":
    main()
