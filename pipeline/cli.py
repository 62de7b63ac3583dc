"""`graftline STAGE`: read params.yaml, call components.<stage>.run with the DVC layout's paths.

Paths here are the contract with dvc.yaml: each stage's deps and outs there
are exactly the inputs and outputs below.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from pipeline import runtime  # noqa: F401  (quiets TensorFlow before it is imported)

# stage -> (module, inputs, outputs), paths relative to the project folder.
STAGES = {
    "ingest": ("components.ingest", {"download_dir": "data/raw"},
               {"examples": "artifacts/examples", "labels": "artifacts/labels.json",
                "report": "reports/ingest.json"}),
    "bottleneck": ("components.bottleneck", {"examples": "artifacts/examples"},
                   {"bottlenecks": "artifacts/bottlenecks", "report": "reports/bottleneck.json"}),
    "train-head": ("components.train_head", {"bottlenecks": "artifacts/bottlenecks", "labels": "artifacts/labels.json"},
                   {"head": "artifacts/head", "metrics": "metrics/train_head.json",
                    "plots": "plots/train_head.csv", "report": "reports/train_head.json"}),
    "fine-tune": ("components.fine_tune", {"examples": "artifacts/examples", "labels": "artifacts/labels.json",
                                           "head": "artifacts/head"},
                  {"model": "artifacts/model", "metrics": "metrics/fine_tune.json", "plots": "plots/fine_tune.csv",
                   "report": "reports/fine_tune.json"}),
    "evaluate": ("components.evaluate", {"examples": "artifacts/examples", "model": "artifacts/model"},
                 {"metrics": "metrics/evaluate.json", "confusion": "plots/confusion.csv",
                  "report": "reports/evaluate.json"}),
}

HELP = {
    "ingest": "photos (folder or archive) -> TFRecord shards per split, labels.json, reports/ingest.json",
    "bottleneck": "TFRecords -> Parquet features of the frozen base (Apache Beam RunInference)",
    "train-head": "train the Dropout + Dense head on the cached features",
    "fine-tune": "train base layers >= fine_tune_at with the head; export artifacts/model/",
    "evaluate": "test split: accuracy, per-class precision/recall/F1, confusion matrix",
}

# What each stage prints when it is done (the full figures are in its output files).
SUMMARY_KEYS = ("num_examples", "splits", "rows", "forward_passes", "val_accuracy", "accuracy",
                "macro_f1", "epochs_run", "wall_time_s")


def run_stage(stage: str, params_path: str) -> dict:
    from pipeline import params as params_mod

    params = params_mod.load(params_path)
    module, inputs, outputs = STAGES[stage]
    runtime.configure(params.seed)
    run = importlib.import_module(module).run
    return run(params, {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="graftline",
        description="Transfer learning on your own photos: the stages of the DVC pipeline, and its TFX twin.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, text in HELP.items():
        sub.add_parser(stage, help=text)
    tfx = sub.add_parser("tfx-run", help="run all five stages as a TFX pipeline on LocalDagRunner")
    tfx.add_argument("--root", default="tfx", help="pipeline root and ML-Metadata store (default: tfx/)")
    args = parser.parse_args(argv)

    from components.errors import GraftlineError

    started = time.time()
    try:
        if args.command == "tfx-run":
            from pipeline import tfx_pipeline

            result = tfx_pipeline.run_local(args.params, Path(args.root))
        else:
            result = run_stage(args.command, args.params)
    except GraftlineError as exc:
        print(f"graftline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graftline {args.command}: interrupted; no output was half-written.", file=sys.stderr)
        return 130
    summary = {k: result[k] for k in SUMMARY_KEYS if k in result}
    summary.setdefault("wall_time_s", round(time.time() - started, 2))
    print(f"graftline {args.command}: done {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
