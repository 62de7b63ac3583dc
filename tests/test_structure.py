"""The house's structure, read statically (no TensorFlow, a second): stages are leaves, and dvc.yaml
declares exactly what each stage's code is and what it reads and writes."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
STAGE_DIR = ROOT / "components" / "stages"
# What a stage reads that DVC does not track: resume state, download and extraction scratch space
# (DVC tracks data.source itself), and the curves the evaluation page shows when they are there
# (no figure depends on them, and CI's gate evaluates without them); and what it writes that DVC
# does not track: TensorBoard's logs (git-ignored on purpose).
NOT_DVC_INPUTS = {"checkpoints", "downloads", "extract_dir", "curves"}
NOT_DVC_OUTPUTS = {"tensorboard"}


def project_modules() -> dict[str, Path]:
    files = list((ROOT / "components").rglob("*.py")) + list((ROOT / "pipeline").rglob("*.py"))
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


MODULES = project_modules()


def imports(module: str) -> set[str]:
    """Project modules that ``module`` imports, anywhere in its body (lazy imports count: they run)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m)
    return seen


def code_files(modules: set[str]) -> set[str]:
    # A package's __init__ is its docstring: not a code dep.
    return {str(MODULES[m].relative_to(ROOT)) for m in modules if MODULES[m].name != "__init__.py"}


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def declared(stage: str) -> tuple[set[str], set[str], set[str]]:
    """(code deps, other deps, outputs) of a dvc.yaml stage."""
    spec = DVC[stage]
    deps = {str(d) for d in spec.get("deps", [])}
    code = {d for d in deps if d.endswith(".py")}
    outs = {next(iter(o)) if isinstance(o, dict) else o
            for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])}
    return code, deps - code, outs


def test_no_stage_module_imports_another():
    stage_modules = {m for m, p in MODULES.items() if p.parent == STAGE_DIR and p.name != "__init__.py"}
    assert {"components.stages.ingest", "components.stages.evaluate", "components.stages.predict"} <= stage_modules
    offenders = {m: sorted(closure(m) & stage_modules - {m}) for m in stage_modules}
    assert not {m: o for m, o in offenders.items() if o}, offenders
    # and the library imports no stage
    library = {m for m, p in MODULES.items() if m.startswith("components") and p.parent != STAGE_DIR}
    assert not {m: sorted(imports(m) & stage_modules) for m in library if imports(m) & stage_modules}


@pytest.mark.parametrize("stage", sorted(DVC))
def test_code_deps_are_the_stage_modules_import_closure(stage):
    command = DVC[stage]["cmd"].split()[1]
    module = STAGES[command][0] if command in STAGES else "pipeline.params"  # check-params: params alone
    code, _, _ = declared(stage)
    expected = code_files(closure(module))
    assert code == expected, (f"dvc.yaml stage {stage}: missing {sorted(expected - code)}, "
                              f"not imported {sorted(code - expected)}")


@pytest.mark.parametrize("command", sorted(STAGES))
def test_dvc_yaml_declares_what_the_stage_reads_and_writes(command):
    _, inputs, outputs = STAGES[command]
    stage = command.replace("-", "_")
    _, deps, outs = declared(stage)
    deps = {d for d in deps if not d.startswith("${")}  # data.source, templated from params.yaml
    assert deps == {p for name, p in inputs.items() if name not in NOT_DVC_INPUTS}
    wanted = {name: p for name, p in outputs.items() if name not in NOT_DVC_OUTPUTS}
    # An output folder may be declared by the files inside it (DVCLive's metrics and plots).
    assert all(any(o == p or o.startswith(p + "/") for o in outs) for p in wanted.values()), (wanted, outs)
    assert all(any(o == p or o.startswith(p + "/") for p in wanted.values()) for o in outs), (wanted, outs)


def test_a_missing_code_dep_is_caught():
    # The check above is not vacuous: the fine-tune closure reaches the library it shares.
    assert {"components/head.py", "components/datasets.py", "components/atomic.py"} <= code_files(
        closure("components.stages.fine_tune"))
