"""`graftline STAGE`: read params.yaml, call components.stages.<stage>.run with the DVC layout's paths.

The paths are pipeline/stages.py's, from which dvc.yaml is generated.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import signal
import sys
import time
from pathlib import Path

from pipeline import console, runtime, stages  # runtime quiets TensorFlow before it is imported

# `graftline train-head` is `graftline train_head`: the hyphenated spelling each stage also answers to.
STAGE_BY_ALIAS = {stage.alias: name for name, stage in stages.STAGES.items() if stage.alias}

# What each stage prints when it is done (the full figures are in its output files).
SUMMARY_KEYS = ("page", "downloaded", "num_examples", "num_skipped", "num_duplicates", "num_label_conflicts", "held_out_accuracy_0_4", "scratch_accuracy", "transfer_accuracy", "splits", "rows", "forward_passes", "val_accuracy", "accuracy",
                "macro_f1", "epochs_run", "pipeline_spec", "training_nodes_with_gpu", "device", "devices",
                "strategy", "replicas", "workers", "task", "chief", "mixed_precision", "wall_time_s")


# Inputs a stage reads if they are there (caches, checkpoints, the curves the evaluation page shows):
# those DVC does not track.
OPTIONAL_INPUTS = {name for stage in stages.STAGES.values() for name, io in stage.inputs.items() if not io.declared}


def missing_input(stage: str, inputs: dict) -> str | None:
    """One line naming the first input another stage makes that is not there yet, and what to run first."""
    def missing(of: dict) -> list[str]:
        return [path for name, path in of.items() if name not in OPTIONAL_INPUTS and not Path(path).exists()]

    def maker(path: str) -> str | None:
        return next((name for name, s in stages.STAGES.items() if path in stages.paths(s.outputs).values()), None)

    gaps = missing(inputs)
    if not gaps:
        return None
    chain, todo = [], [maker(gaps[0])]
    while todo and todo[0] and todo[0] not in chain:  # walk back to the first stage whose inputs are there
        chain.insert(0, todo[0])
        todo = [maker(p) for p in missing(stages.paths(stages.STAGES[todo[0]].inputs))][:1]
    if not chain:
        return f"{gaps[0]} not found: {stage} needs it"
    steps = " then ".join(f"`graftline {s}`" for s in chain)
    return f"{gaps[0]} not found: {stage} needs it; run {steps} first, or `dvc repro {stage}`"


def run_stage(name: str, params_path: str) -> dict:
    """Validate params, check inputs and devices, run the stage; its tracked outputs replace the last set only
    when it completes (components.atomic.output_set)."""
    from components import atomic
    from components.errors import GraftlineError
    from pipeline import params as params_mod

    stage = stages.STAGES[STAGE_BY_ALIAS.get(name, name)]
    params = params_mod.load(params_path)
    if stage.trains:
        runtime.check_training(params.train)  # device and TF_CONFIG errors first: no input fixes them
    inputs, outputs = stages.paths(stage.inputs), stages.paths(stage.outputs)
    problem = missing_input(stage.name, inputs)
    if problem:
        raise GraftlineError(problem)
    if stage.tensorflow:
        runtime.configure_devices(stage, params)  # before TensorFlow sets up its devices
        runtime.configure(params.seed if stage.seeded else 0)  # determinism; no random draws in an unseeded one
    run = importlib.import_module(stage.module).run
    staged = {k: Path(v) for k, v in stage.staged_outputs().items()}
    # Workers of one multi-worker run share the project when they share a machine's disk.
    shared_by_workers = stage.trains and params.train.strategy == "multi_worker"
    alone = contextlib.nullcontext() if shared_by_workers else atomic.one_at_a_time(Path(stage.lock),
                                                                                  f"graftline {stage.name}")
    with alone, atomic.output_set(staged, Path(stage.journal)) as temporary:
        result = run(params, {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()} | temporary)
    final_name = {str(temporary[k]): str(path) for k, path in staged.items()}
    return {k: final_name.get(v, v) if isinstance(v, str) else v for k, v in result.items()}


def build_parser() -> argparse.ArgumentParser:
    """Every command with its arguments and its handler (``args.run(args)``: a result to summarise, or an exit code)."""
    parser = argparse.ArgumentParser(
        prog="graftline",
        description="Transfer learning on your own photos: the stages of the DVC pipeline, and its TFX twin.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str, aliases=()):
        found = sub.add_parser(name, help=help, aliases=list(aliases))
        found.set_defaults(run=run)
        return found

    for name, stage in stages.STAGES.items():
        command(name, lambda args, name=name: run_stage(name, args.params), stage.help,
                [stage.alias] if stage.alias else [])
    command("check-params", check_params, "validate params.yaml and run nothing (every stage does it first)")
    tfx = command("tfx-run", tfx_run, "run the stages as a TFX pipeline on LocalDagRunner")
    tfx.add_argument("--root", default="tfx", help="pipeline root and ML-Metadata store (default: tfx/)")
    compile_ = command("tfx-compile", tfx_compile, "compile the TFX pipeline to a Kubeflow V2 / Vertex pipeline spec")
    compile_.add_argument("--target", choices=("vertex", "kubeflow"), required=True)
    compile_.add_argument("--output", help="folder for pipeline.json (default: build/<target>)")
    compile_.add_argument("--pipeline-root", help="where runs write artifacts (default: a placeholder per target)")
    gate_ = command("gate", gate, "fail (exit 1) when metrics miss evaluate.thresholds or accuracy dropped more "
                                  "than evaluate.max_drop below a baseline")
    gate_.add_argument("--baseline", help="baseline metrics file, e.g. main's metrics/evaluate.json")
    gate_.add_argument("--current", default="metrics/evaluate.json", help="default: metrics/evaluate.json")
    devices = command("devices", training_devices, "set up TensorFlow as the training stages do; print what they "
                                                   "would use")
    devices.add_argument("--device", choices=("auto", "cpu", "gpu"), help="instead of train.device from params")
    predict_ = command("predict", predict, "top classes of photos (files or folders) from the exported model")
    predict_.add_argument("targets", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict_.add_argument("--top-k", type=int, default=3, help="classes per photo (default 3)")
    predict_.add_argument("--json", action="store_true", help="print JSON instead of one line per photo")
    predict_.add_argument("--model", default="artifacts/model", help="exported model folder (default artifacts/model)")
    preset_ = command("preset", preset, "merge presets/NAME.yaml over params.yaml (comments kept)")
    preset_.add_argument("name", nargs="?", help="preset name; without it, list the presets")
    pretrain = command("pretrain-digits", pretrain_digits, "digits recipe: train a small CNN on digits 0-4, write "
                                                           "5-9 photos")
    pretrain.add_argument("--out", default="data/digits", help="output folder (default data/digits)")
    pretrain.add_argument("--epochs", type=int, default=5)
    pretrain.add_argument("--image-size", type=int, default=32)
    command("scratch", scratch, "control: the base's architecture from random weights, same photos and epoch budget")
    plots = command("plots", offline_plots, "`dvc plots show` with local vega scripts: a page that draws offline")
    plots.add_argument("--out", default="dvc_plots", help="folder for index.html (default dvc_plots)")
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM (timeout, a cancelled CI job, docker stop) handled as Ctrl-C: the same cleanup, one line.

    Its message starts with the signal's name; Beam re-raises it with the step appended ("SIGTERM [while
    running 'Write part']")."""

    @property
    def signal_name(self) -> str:
        return str(self).split(" ", 1)[0]


def _terminated(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.hide_native_logs()  # before anything imports TensorFlow
    signal.signal(signal.SIGTERM, _terminated)

    from components.errors import GraftlineError

    started = time.time()
    try:
        result = args.run(args)
    except GraftlineError as exc:
        one_line = " ".join(str(exc).split())  # a library's multi-line message (tarfile's) made one line
        console.end_progress_bars()
        print(f"graftline {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Exception) as exc:
        # Python wraps what a signal handler raises inside some calls (a class body's __set_name__ while a
        # module imports) in a RuntimeError: the interruption is its cause.
        cause = exc
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__
        if cause is None:
            raise
        name = cause.signal_name if isinstance(cause, Interrupted) else "SIGINT"
        console.end_progress_bars()
        print(f"graftline {args.command}: interrupted by {name}; no output was half-written.", file=sys.stderr)
        return 128 + signal.Signals[name]
    if isinstance(result, int):  # a command that printed its own outcome: its exit code
        return result
    summary = {k: result[k] for k in SUMMARY_KEYS if k in result}
    summary.setdefault("wall_time_s", round(time.time() - started, 2))
    print(f"graftline {args.command}: done {json.dumps(summary)}")
    return 0


def check_params(args) -> dict:
    from pipeline import params as params_mod

    params_mod.load(args.params)
    return {}


def tfx_run(args) -> dict:
    from pipeline import tfx_pipeline

    return tfx_pipeline.run_local(args.params, Path(args.root))


def tfx_compile(args) -> dict:
    from pipeline import params as params_mod

    params_mod.load(args.params)  # a bad value fails in a second, before TFX and TensorFlow are imported
    from pipeline import tfx_pipeline

    return tfx_pipeline.compile_spec(args.params, args.target, args.output, args.pipeline_root)


def pretrain_digits(args) -> dict:
    from components.stages import pretrain

    runtime.configure(42)
    return pretrain.run(Path(args.out), args.image_size, args.epochs)


def gate(args) -> int:
    """`graftline gate`: exit 1 with one line per failed check (a missing or bad file is an error, exit 2)."""
    from components import gate as gate_mod
    from pipeline import params as params_mod

    e = params_mod.load(args.params).evaluate
    now = gate_mod.read_metrics(Path(args.current), "--current")
    base = gate_mod.read_metrics(Path(args.baseline), "--baseline") if args.baseline else None
    failures = gate_mod.failures(now, base, e.thresholds, e.max_drop)
    for failure in failures:
        print(f"graftline gate: failed: {failure}", file=sys.stderr)
    if not failures:
        print(f"graftline gate: passed: {gate_mod.summary(now, base, e.thresholds, e.max_drop)}")
    return 1 if failures else 0


def predict(args) -> int:
    from components.stages import predict as predict_mod
    from components.errors import GraftlineError

    if args.top_k < 1:
        raise GraftlineError(f"--top-k {args.top_k}: expected an integer >= 1")
    # The project's data.max_pixels, as ingest and the exported serve signature refuse (outside a project: its default)
    from pipeline import params as params_mod

    max_pixels = params_mod.load(args.params).data.max_pixels if Path(args.params).exists() else \
        params_mod.DataParams().max_pixels
    results, photos = predict_mod.check(Path(args.model), args.targets, max_pixels)
    if photos:  # TensorFlow only loads when there is a photo to predict
        runtime.cpu_only()  # one photo per call on the CPU, as evaluate runs: the same answers
        predict_mod.predict(Path(args.model), photos, args.top_k)
    if results:
        print(json.dumps(results, indent=2) if args.json else predict_mod.as_text(results))
    predict_mod.require_some(results, args.targets)
    return 0


def preset(args) -> int:
    from pipeline import presets

    params_path, name = args.params, args.name
    folder = presets.folder_for(Path(params_path))
    if not name:
        print("\n".join(presets.names(folder)))
        return 0
    line = presets.apply(name, Path(params_path))
    print(f"graftline preset: {params_path} now holds preset {name!r}; run `dvc repro`, or as an experiment:")
    print("\n".join(line))
    from components.stages.ingest import MADE_BY
    from pipeline import params as params_mod

    source = params_mod.load(params_path).data.source
    made_by = next((cmd for folder, cmd in MADE_BY.items() if Path(source).is_relative_to(folder)), None)
    if made_by and not Path(source).exists():
        print(f"graftline preset: data.source {source} does not exist yet: run `{made_by}` first")
    return 0


def scratch(args) -> dict:
    from components.stages import scratch as scratch_mod
    from pipeline import params as params_mod

    params = params_mod.load(args.params)
    if params.train.strategy == "multi_worker":  # a one-process control run: it would join a cluster it never uses
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, strategy="auto"))
    runtime.configure_training(params.train)  # it trains, as train_head does
    runtime.configure(params.seed)
    result = scratch_mod.run(params, {"examples": Path("artifacts/examples"), "labels": Path("artifacts/labels.json"),
                                      "head_metrics": Path("metrics/train_head.json"),
                                      "fine_tune_metrics": Path("metrics/fine_tune.json"),
                                      "transfer_metrics": Path("metrics/evaluate.json")},
                             {"metrics": Path("metrics/scratch.json")})
    print(f"graftline scratch: test accuracy {result['transfer_accuracy']:.3f} transferred vs "
          f"{result['scratch_accuracy']:.3f} from scratch ({result['epochs']} epochs each)")
    return result


TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def offline_plots(args) -> dict:
    """`dvc plots show` into ``out`` with templates/dvc_plots.html, whose vega scripts sit beside the page.

    DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine without the
    internet it stays blank; the template names the same versions, copied here from templates/vega/.
    """
    import shutil
    import subprocess

    from components.errors import GraftlineError

    out = Path(args.out)
    done = subprocess.run(["dvc", "plots", "show", "--html-template", str(TEMPLATES / "dvc_plots.html"),
                           "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise GraftlineError(f"dvc plots show failed: {done.stderr.strip() or done.stdout.strip()}")
    for script in sorted((TEMPLATES / "vega").glob("*.min.js")):
        shutil.copy2(script, out / script.name)
    return {"page": str(out / "index.html")}


def training_devices(args) -> dict:
    """`graftline devices`: what train-head and fine-tune would run on here (a GPU runner's pre-flight).

    With train.strategy multi_worker it joins the cluster TF_CONFIG names, as the stages do.
    """
    from components import devices
    from pipeline import params as params_mod

    train = params_mod.load(args.params).train
    runtime.configure_training(dataclasses.replace(train, device=args.device or train.device))
    return devices.placement(devices.strategy(train.strategy))


if __name__ == "__main__":
    sys.exit(main())
