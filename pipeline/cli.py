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
                "macro_f1", "epochs_run", "pipeline_spec", "training_nodes_with_gpu", "device", "devices",
                "strategy", "replicas", "mixed_precision", "wall_time_s")


def run_stage(stage: str, params_path: str) -> dict:
    from pipeline import params as params_mod

    params = params_mod.load(params_path)
    module, inputs, outputs = STAGES[stage]
    runtime.configure_devices(module.split(".")[-1], params)  # before TensorFlow sets up its devices
    runtime.configure(params.seed)
    run = importlib.import_module(module).run
    return run(params, {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()})


def build_parser() -> argparse.ArgumentParser:
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
    compile_ = sub.add_parser("tfx-compile", help="compile the TFX pipeline to a Kubeflow V2 / Vertex pipeline spec")
    compile_.add_argument("--target", choices=("vertex", "kubeflow"), required=True)
    compile_.add_argument("--output", help="folder for pipeline.json (default: build/<target>)")
    compile_.add_argument("--pipeline-root", help="where runs write artifacts (default: a placeholder per target)")
    gate = sub.add_parser("gate", help="fail (exit 1) when metrics miss evaluate.thresholds or accuracy dropped "
                                       "more than evaluate.max_drop below a baseline")
    gate.add_argument("--baseline", help="baseline metrics file, e.g. main's metrics/evaluate.json")
    gate.add_argument("--current", default="metrics/evaluate.json", help="default: metrics/evaluate.json")
    devices = sub.add_parser("devices", help="set up TensorFlow as the training stages do; print what they would use")
    devices.add_argument("--device", choices=("auto", "cpu", "gpu"), help="instead of train.device from params")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from components.errors import GraftlineError

    started = time.time()
    try:
        if args.command == "tfx-run":
            from pipeline import tfx_pipeline

            result = tfx_pipeline.run_local(args.params, Path(args.root))
        elif args.command == "tfx-compile":
            from pipeline import tfx_pipeline

            result = tfx_pipeline.compile_spec(args.params, args.target, args.output, args.pipeline_root)
        elif args.command == "gate":
            return gate(args.params, args.current, args.baseline)
        elif args.command == "devices":
            result = training_devices(args.params, args.device)
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


def gate(params_path: str, current: str, baseline: str | None) -> int:
    """`graftline gate`: exit 1 with one line per failed check (a missing or bad file is an error, exit 2)."""
    from components import gate as gate_mod
    from pipeline import params as params_mod

    e = params_mod.load(params_path).evaluate
    now = gate_mod.read_metrics(Path(current), "--current")
    base = gate_mod.read_metrics(Path(baseline), "--baseline") if baseline else None
    failures = gate_mod.failures(now, base, e.thresholds, e.max_drop)
    for failure in failures:
        print(f"graftline gate: failed: {failure}", file=sys.stderr)
    if not failures:
        print(f"graftline gate: passed: {gate_mod.summary(now, base, e.thresholds, e.max_drop)}")
    return 1 if failures else 0


def training_devices(params_path: str, device: str | None) -> dict:
    """`graftline devices`: what train-head and fine-tune would run on here (a GPU runner's pre-flight)."""
    import dataclasses

    from components import devices
    from pipeline import params as params_mod

    train = params_mod.load(params_path).train
    runtime.configure_training(dataclasses.replace(train, device=device or train.device))
    return devices.placement(devices.strategy())


if __name__ == "__main__":
    sys.exit(main())
