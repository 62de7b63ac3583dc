"""Every stage's paths, written once: `graftline <stage>` runs the stage with them and dvc.yaml is
generated from them (``python -m pipeline.stages``; tests/test_structure.py fails when dvc.yaml
differs from what this table makes).

A stage is its module (``components/stages/<stage>.py``), the paths its ``run(params, inputs,
outputs)`` knows by name, the params it reads, and how DVC sees each path. Code deps are not
written anywhere: they are the import closure of the stage's module, computed when dvc.yaml is
generated. Static: no TensorFlow, no Beam.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CACHE = (("cache", False),)


@dataclass(frozen=True)
class Declared:
    """One entry of a dvc.yaml stage's outs, metrics or plots."""
    section: str  # outs | metrics | plots
    path: str
    options: tuple = ()  # (key, value) pairs, as dvc.yaml writes them under the path
    comment: str = ""


@dataclass(frozen=True)
class Io:
    """A path a stage reads or writes; ``declared`` is how dvc.yaml shows it (nothing: DVC does not track it)."""
    path: str
    declared: tuple[Declared, ...] = ()


def out(path: str, section: str = "outs", *options, comment: str = "") -> Io:
    return Io(path, (Declared(section, path, tuple(options), comment),))


def dep(path: str) -> Io:
    return Io(path, (Declared("deps", path),))


def untracked(path: str) -> Io:
    return Io(path)


def live(stage: str) -> Io:
    """DVCLive's folder: its metrics.json a DVC metric, its per-metric TSVs DVC plots."""
    folder = f"dvclive/{stage}"
    return Io(folder, (Declared("metrics", f"{folder}/metrics.json", NO_CACHE),
                       Declared("plots", f"{folder}/plots/metrics", NO_CACHE + (("x", "step"),))))


@dataclass(frozen=True)
class Stage:
    name: str  # THE name: dvc.yaml's stage, `graftline <name>`, components/stages/<name>.py
    help: str  # what `graftline --help` says of it
    inputs: dict[str, Io]
    outputs: dict[str, Io]
    params: tuple[str, ...]
    trains: bool = False  # follows train.device / mixed_precision / strategy (else float32, and no GPU if cpu_only)
    cpu_only: bool = False  # hides any GPU when it runs in a process of its own: same figures on CPU and GPU runners
    tensorflow: bool = True  # False: never imports it, so its command skips TensorFlow's setup (seconds a run)
    comment: str = ""
    data_deps: tuple[str, ...] = ()  # deps that are not another stage's output (with their comment lines)
    also_runs: tuple[str, ...] = ()  # modules the command runs besides the stage's (their closure: code deps too)
    # Each run makes every tracked output anew, and they replace the last set together (components.atomic.
    # output_set), so dvc.yaml marks them persist: DVC must not delete the last good set before the run.
    # False: the stage adds to its output (download's folder) and says so in its own options.
    replaces_outputs: bool = True

    @property
    def module(self) -> str:
        return f"components.stages.{self.name}"

    @property
    def alias(self) -> str | None:
        """The spelling with hyphens (`graftline train-head`), which the CLI also accepts; the docs use the name."""
        return self.name.replace("_", "-") if "_" in self.name else None

    @property
    def journal(self) -> str:
        """Where a run lists the outputs it is putting in place, so that a run killed doing it is completed."""
        return f"{CHECKPOINTS}/{self.name}-outputs.json"

    @property
    def lock(self) -> str:
        """Held while the stage runs: a second `graftline <stage>` in the project is refused, not run beside it."""
        return f"{CHECKPOINTS}/{self.name}.lock"

    @property
    def seeded(self) -> bool:
        """Whether it reads `seed` (a stage that does not is not re-run when it changes)."""
        return "seed" in self.params or "params.yaml:" in self.params

    def staged_outputs(self) -> dict[str, str]:
        """The outputs replaced as one set: those DVC tracks (TensorBoard's logs are written in place)."""
        return {name: io.path for name, io in self.outputs.items() if io.declared and self.replaces_outputs}


TRAINING = ("train.device", "train.mixed_precision", "train.strategy")
CHECKPOINTS = "data/checkpoints"  # what a killed run leaves for the next one (git-ignored, not a DVC output)
PERSIST = (("persist", True),)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("download", "data.url -> data.source when it lies in data/download/ (so DVC tracks a local archive)", {},
          {"folder": out("data/download", "outs", *PERSIST)},
          ("data.source", "data.url", "data.sha256"), replaces_outputs=False, tensorflow=False,
          comment="data.url -> data.source when data.source lies in data/download/ (a URL cannot be a DVC dep "
                  "offline)."),
    Stage("ingest", "photos (folder or archive) -> TFRecord shards per split, labels.json, reports/ingest.json",
          {"downloads": untracked("data/download"), "extract_dir": untracked("data/raw")},
          {"examples": out("artifacts/examples"), "labels": out("artifacts/labels.json"),
           "report": out("reports/ingest.json", "outs", *NO_CACHE)},
          ("data",), cpu_only=True, tensorflow=False,
          data_deps=("# the photos themselves: DVC hashes the folder or archive (its state cache skips unchanged "
                     "files)", "${data.source}", "# the photos left out (reports/audit.html says which to consider)",
                     "${data.exclude}")),
    Stage("bottleneck", "TFRecords -> Parquet features of the frozen base (Apache Beam RunInference)",
          {"examples": dep("artifacts/examples")},
          {"bottlenecks": out("artifacts/bottlenecks"), "report": out("reports/bottleneck.json", "outs", *NO_CACHE)},
          ("base", "input_block.upsample", "bottleneck")),  # not seed: random weights have their own (backbone.py)
    Stage("audit", "label issues, near-duplicates and outliers in the photos (cleanlab on the features): "
                   "reports/audit.html",
          {"bottlenecks": dep("artifacts/bottlenecks"), "labels": dep("artifacts/labels.json"),
           "examples": dep("artifacts/examples")},
          {"report": out("reports/audit.json", "outs", *NO_CACHE),
           "html": out("reports/audit.html", "outs", *NO_CACHE,
                       comment="label issues, near-duplicates, outliers, with thumbnails")},
          ("seed", "audit", "data.exclude"), tensorflow=False),
    Stage("train_head", "train the Dropout + Dense head on the cached features",
          {"bottlenecks": dep("artifacts/bottlenecks"), "labels": dep("artifacts/labels.json")},
          {"head": out("artifacts/head"), "report": out("reports/train_head.json", "outs", *NO_CACHE),
           "metrics": out("metrics/train_head.json", "metrics", *NO_CACHE),
           "plots": out("plots/train_head.csv", "plots", *NO_CACHE, ("x", "epoch")),
           "live": live("train_head"), "tensorboard": untracked("logs/train_head")},
          ("seed", "train_head") + TRAINING, trains=True),
    Stage("fine_tune", "train base layers >= fine_tune_at with the head; export artifacts/model/",
          {"examples": dep("artifacts/examples"), "labels": dep("artifacts/labels.json"),
           "head": dep("artifacts/head"), "checkpoints": untracked(f"{CHECKPOINTS}/fine_tune")},
          {"model": out("artifacts/model"), "report": out("reports/fine_tune.json", "outs", *NO_CACHE),
           "metrics": out("metrics/fine_tune.json", "metrics", *NO_CACHE),
           "plots": out("plots/fine_tune.csv", "plots", *NO_CACHE, ("x", "epoch")),
           "live": live("fine_tune"),
           "curves": out("plots/learning_curves.png", "plots", *NO_CACHE),
           "tensorboard": untracked("logs/fine_tune")},
          ("seed", "fine_tune_at", "base", "input_block", "augment", "fine_tune", "export", "bottleneck.cache_dir",
           "data.max_pixels") + TRAINING, trains=True),  # data.max_pixels: what serve refuses
    # curves: shown on the evaluation page when there; no figure depends on them, and CI's gate
    # evaluates a model trained elsewhere, so they are not a DVC dep.
    Stage("evaluate", "test split: accuracy, per-class precision/recall/F1, confusion matrix",
          {"examples": dep("artifacts/examples"), "model": dep("artifacts/model"),
           "curves": untracked("plots/learning_curves.png")},
          {"report": out("reports/evaluate.json", "outs", *NO_CACHE),
           "html": out("reports/evaluate.html", "outs", *NO_CACHE,
                       comment="the page a person opens: figures, curves, confusion, mistakes"),
           "metrics": out("metrics/evaluate.json", "metrics", *NO_CACHE),
           "confusion": out("plots/confusion.csv", "plots", *NO_CACHE, ("template", "confusion"), ("x", "actual"),
                            ("y", "predicted")),
           "confusion_png": out("plots/confusion.png", "plots", *NO_CACHE)},
          ("params.yaml:",), also_runs=("pipeline.params",), cpu_only=True,
          comment="params: all of params.yaml, which every stage's command validates before anything else. Every\n"
                  "change to it reaches this stage, so a misspelled key (dvc exp run -S +fine_tun_at=120) fails\n"
                  "the run in a second even when no stage's params changed. It reads evaluate.top_k, .mistakes\n"
                  "and .thresholds; a change to a param no stage reads (tfx.image) re-runs only this stage."),
)}


def paths(ios: dict[str, Io]) -> dict[str, str]:
    return {name: io.path for name, io in ios.items()}


# ------------------------------------------------------------------ code deps: the import closure


def project_modules() -> dict[str, Path]:
    files = list((ROOT / "components").rglob("*.py")) + list((ROOT / "pipeline").rglob("*.py"))
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports(module: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its body (lazy imports count: they run)."""
    found = set()
    for node in ast.walk(ast.parse(modules[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def closure(module: str, modules: dict[str, Path] | None = None) -> set[str]:
    modules = modules or project_modules()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m, modules)
    return seen


def code_deps(module: str, *also: str) -> list[str]:
    """The stage module's file first, then every project file it (or ``also``) imports, directly or not,
    sorted. A package's __init__ is its docstring: not a code dep."""
    modules = project_modules()
    reached = set().union(*(closure(m, modules) for m in (module, *also)))
    files = {str(modules[m].relative_to(ROOT)) for m in reached if modules[m].name != "__init__.py"}
    first = str(modules[module].relative_to(ROOT))
    return [first] + sorted(files - {first})


# ------------------------------------------------------------------ dvc.yaml


HEADER = """\
# GENERATED from pipeline/stages.py by `python -m pipeline.stages`: edit that table, not this file.
# Five stages, each one `graftline <stage>`, after a small download one, and audit beside them (what is
# wrong with the photos). Deps and params are exactly what each stage reads (evaluate: all params, see
# there), so `dvc exp run -S fine_tune_at=N` re-runs fine_tune and evaluate only. Code deps are the import closure of the stage's module.
# persist: a stage's outputs replace the last set only when it completes (a failed or killed run leaves
# them in place, dvc.lock saying they are stale); so DVC must not delete them first.
stages:"""

PLOTS = """\
# Head and fine-tune curves on one axis (fine-tune epochs continue the head's numbering).
plots:
  - accuracy:
      x: epoch
      y:
        plots/train_head.csv: [accuracy, val_accuracy]
        plots/fine_tune.csv: [accuracy, val_accuracy]
  - loss:
      x: epoch
      y:
        plots/train_head.csv: [loss, val_loss]
        plots/fine_tune.csv: [loss, val_loss]
"""


def _value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def dvc_yaml() -> str:
    lines = [HEADER]
    for stage in STAGES.values():
        lines += [f"  # {line}" for line in stage.comment.splitlines()]
        lines += [f"  {stage.name}:", f"    cmd: graftline {stage.name}", "    deps:"]
        lines += [f"      {d}" if d.startswith("#") else f"      - {d}" for d in stage.data_deps]
        lines += [f"      - {d.path}" for io in stage.inputs.values() for d in io.declared]
        lines += [f"      - {path}" for path in code_deps(stage.module, *stage.also_runs)]
        lines.append("    params:")
        lines += [f"      - {p}" for p in stage.params]
        declared = [d for io in stage.outputs.values() for d in io.declared]
        for section in ("outs", "metrics", "plots"):
            entries = [d for d in declared if d.section == section]
            if entries:
                lines.append(f"    {section}:")
            for d in entries:
                options = d.options + (PERSIST if stage.replaces_outputs else ())
                comment = f"   # {d.comment}" if d.comment else ""
                lines.append(f"      - {d.path}{':' if options else ''}{comment}")
                lines += [f"          {key}: {_value(value)}" for key, value in options]
        lines.append("")
    return "\n".join(lines) + PLOTS


if __name__ == "__main__":
    (ROOT / "dvc.yaml").write_text(dvc_yaml())
    print(f"wrote {ROOT / 'dvc.yaml'}")
