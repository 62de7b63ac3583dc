"""The house's structure, read statically (no TensorFlow, a second): stages are leaves, each stage's
paths are written once (pipeline/stages.py) and dvc.yaml is what that table makes, code deps
included (each stage module's import closure)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline import cli, stages

ROOT = Path(__file__).resolve().parents[1]
MODULES = stages.project_modules()
STAGE_MODULES = {m for m, p in MODULES.items() if p.parent == ROOT / "components" / "stages" and p.name != "__init__.py"}


def test_no_stage_module_imports_another():
    assert {"components.stages.ingest", "components.stages.evaluate", "components.stages.predict"} <= STAGE_MODULES
    offenders = {m: sorted(stages.closure(m, MODULES) & STAGE_MODULES - {m}) for m in STAGE_MODULES}
    assert not {m: o for m, o in offenders.items() if o}, offenders
    # and the library imports no stage
    library = {m for m in MODULES if m.startswith("components") and m not in STAGE_MODULES}
    assert not {m: sorted(stages.imports(m, MODULES) & STAGE_MODULES) for m in library
                if stages.imports(m, MODULES) & STAGE_MODULES}


def test_dvc_yaml_is_what_the_stage_table_generates():
    assert (ROOT / "dvc.yaml").read_text() == stages.dvc_yaml(), \
        "dvc.yaml differs from pipeline/stages.py's table (or a stage's imports changed): run python -m pipeline.stages"


def test_code_deps_are_the_import_closure_lazy_imports_included():
    lock = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = set(lock["fine_tune"]["deps"])
    # fine-tune reaches the library it shares, and what devices imports only when asked for multi_worker
    assert {"components/stages/fine_tune.py", "components/head.py", "components/datasets.py", "components/atomic.py",
            "components/multi_worker.py"} <= deps
    assert not any("stages/train_head" in d for d in deps)  # no stage in another's closure
    # a module added to the closure shows up: the generator reads imports, not a list
    assert stages.code_deps("components.stages.evaluate")[0] == "components/stages/evaluate.py"
    assert "components/report.py" in stages.code_deps("components.stages.evaluate")


def test_one_name_per_stage_from_the_table():
    lock = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(lock) == list(stages.STAGES)  # dvc.yaml's stage names are the table's
    parser = cli.build_parser()
    for name, stage in stages.STAGES.items():
        assert lock[name]["cmd"] == f"graftline {name}" and stage.module == f"components.stages.{name}"
        assert (ROOT / "components" / "stages" / f"{name}.py").is_file()
        # the CLI answers to the name, and to the hyphenated spelling, with the same stage
        for spelling in filter(None, (name, stage.alias)):
            args = parser.parse_args([spelling])
            assert args.run.__defaults__ == (name,), spelling
    assert {n for n, s in stages.STAGES.items() if s.trains} == {"train_head", "fine_tune"}
    # what DVC does not track is what the CLI lets be missing
    assert cli.OPTIONAL_INPUTS == {"downloads", "extract_dir", "checkpoints", "curves"}


def test_no_import_cycle_between_library_modules():
    library = {m for m in MODULES if m.startswith("components") and m not in STAGE_MODULES}
    cycles = {m: sorted(o for o in stages.imports(m, MODULES) & library if m in stages.closure(o, MODULES))
              for m in library}
    assert not {m: c for m, c in cycles.items() if c}, cycles


def test_these_checks_need_neither_tensorflow_nor_beam():
    import subprocess
    import sys

    probe = ("import sys; sys.path.insert(0, 'tests'); import test_structure; "
             "test_structure.test_dvc_yaml_is_what_the_stage_table_generates(); "
             "print(sorted(m for m in ('tensorflow', 'keras', 'apache_beam') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_xdist_groups_take_effect(request):
    """Under xdist this test's id carries its group (tests/conftest.py). Without it every worker would build
    its own session pipeline: pytest 9.2 moved the node ids that xdist 3.8 rewrites, and nothing said so."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not under xdist (pytest -n 0)")
    assert request.node.nodeid.endswith("@test_structure"), request.node.nodeid
