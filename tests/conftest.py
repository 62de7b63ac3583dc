"""Shared fixtures: where ../shared is, and ONE real pipeline run per test session.

The end-to-end fixtures copy this repo into a temporary git repo, point
params at ../shared/data/flowers, give Keras a temporary KERAS_HOME holding
the shared ImageNet weights, and run the real `dvc repro`, then
`graftline tfx-run`. Many tests read their outputs; tests that change a
project (experiments, the CI gate) work on a copy (test_ci_evaluate.copy_project).
Without ../shared they skip, unless GRAFTLINE_REQUIRE_SHARED=1 (set by
.ci/run), which turns the skip into a failure.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GRAFTLINE_SHARED", REPO.parent / "shared"))
FLOWERS = SHARED / "data" / "flowers"
WEIGHTS_224 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
# What Keras looks for at the default 160 px; the 224 file works at 160 (../shared/weights/README.md).
KERAS_NAME_160 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"
BIN = Path(sys.executable).parent
# Keep what the pipeline wrote after the first `dvc repro`, before a test changes it.
SNAPSHOT = ("params.yaml", "dvc.lock", "metrics", "plots", "reports", "artifacts/labels.json")


# The fixtures of one session pipeline (below): every test that uses one runs on the same xdist worker.
SESSION_PIPELINE = {"project", "tfx_run"}
# More workers than this would each hold TensorFlow (GBs) for little gain on a small machine.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """xdist groups (--dist loadgroup): the session pipeline's tests in one, each other module in its own, so
    that session- and module-scoped fixtures run once in the whole run, not once per worker."""
    for item in items:
        uses_pipeline = SESSION_PIPELINE & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.xdist_group("session-pipeline" if uses_pipeline else item.path.stem))
        if uses_pipeline and not item.get_closest_marker("e2e"):  # else `make test-fast` would build the pipeline
            raise pytest.UsageError(f"{item.nodeid} uses the session pipeline ({', '.join(sorted(uses_pipeline))}): "
                                    "mark it @pytest.mark.e2e")


def require_shared() -> None:
    missing = [p for p in (FLOWERS, WEIGHTS_224) if not p.exists()]
    if missing:
        message = f"needs ../shared (flower photos and ImageNet weights); missing: {', '.join(map(str, missing))}"
        if os.environ.get("GRAFTLINE_REQUIRE_SHARED") == "1":
            pytest.fail(message + " (GRAFTLINE_REQUIRE_SHARED=1 forbids skipping)")
        pytest.skip(message)


def project_env(keras_home: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["KERAS_HOME"] = str(keras_home)
    env.setdefault("GIT_AUTHOR_NAME", "graftline tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@graftline.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "graftline tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@graftline.invalid")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(cmd: list[str], cwd: Path, env: dict, log: Path, timeout: int = 1200) -> str:
    """Run a command; on failure show its output. Returns stdout+stderr."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    log.write_text(output)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}; output ({log}):\n{output[-6000:]}")
    return output


@contextlib.contextmanager
def keras_home_set(home: Path):
    """KERAS_HOME is ``home`` in this process inside the block (what resolve_weights reads), as it was after."""
    old = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("KERAS_HOME")
        else:
            os.environ["KERAS_HOME"] = old


def keras_home_with_weights(folder: Path) -> Path:
    """A KERAS_HOME whose models/ holds the shared 224 px weights under the name Keras looks up at 160 px."""
    (folder / "models").mkdir(parents=True)
    shutil.copy(WEIGHTS_224, folder / "models" / KERAS_NAME_160)
    return folder


def write_untrained_head(head_dir: Path, labels: list[str]) -> None:
    """A head folder as train-head leaves it (components/head.py's files), its head over MobileNetV2's 1280
    features untrained: for tests of how fine-tune trains and writes, not of what it reaches."""
    from components import head as head_lib
    from components import recipe
    from components.atomic import write_csv, write_json

    head_dir.mkdir(parents=True)
    head_lib.build_head(1280, len(labels), 0.2).save(head_dir / head_lib.HEAD_FILE)
    write_json(head_dir / head_lib.HEAD_INFO, {"labels": labels, "epochs_run": 1})
    write_csv(head_dir / head_lib.HEAD_HISTORY, recipe.CURVE_COLUMNS, [])


def backbone_of(training: bool = True, **sections):
    """The Backbone (components/backbone.py) of params with these sections (``base={...}``, ``input_block={...}``,
    ``fine_tune_at=...``), each base's weights resolved as a stage resolves them."""
    from components.backbone import Backbone
    from pipeline import params as params_mod

    return Backbone.from_params(params_mod.from_dict(sections), training)


# The last stdout line of cli_probe when the command did not import TensorFlow.
TENSORFLOW_NOT_LOADED = "tensorflow loaded: False"


def cli_probe(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """`graftline ARGS` in a fresh process whose last stdout line says whether TensorFlow was imported."""
    probe = ("import sys; sys.argv = ['graftline', *sys.argv[1:]]; from pipeline.cli import main; code = main(); "
             "print('tensorflow loaded:', 'tensorflow' in sys.modules); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Project:
    root: Path  # the temporary git + DVC repo
    first: Path  # SNAPSHOT files as the first `dvc repro` left them
    env: dict
    repro_log: str


# The suite's pipelines run one base, fine-tuned, with both TFLite files: MobileNetV2 at 160 px from layer 100,
# the mechanisms every recipe shares at a fraction of the default's cost. The default itself (three frozen bases) runs whole in
# tests/test_backbone.py, from a copy with ``recipe=None``.
ONE_BASE = {"base": {"model": "mobilenet_v2", "image_size": 0}, "fine_tune_at": 100,
            "export": {"tflite": ["float", "dynamic_range"]}}


def copy_repo(dest: Path, recipe: dict | None = ONE_BASE) -> None:
    """Copy the files git would commit (tracked, and untracked but not ignored); then ``recipe`` over the copy's
    params.yaml, as `graftline preset` writes one (comments kept)."""
    from pipeline import presets

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if recipe:
        presets.write_overlay(recipe, dest / "params.yaml")


def small_dvc_project(folder: Path, classes: tuple[str, ...], per_class: int, **sections: dict
                      ) -> tuple[Path, Path, dict, Path]:
    """(project root, photo folder, env, log folder): this repo in a new git repo under ``folder``, its params
    pointing at ``per_class`` shared flower photos of each class (copied to ``folder``/photos) and updated by
    ``sections`` (params section -> values); committed, nothing run yet."""
    import yaml

    photos, root, logs = folder / "photos", folder / "project", folder / "logs"
    for name in classes:
        (photos / name).mkdir(parents=True)
        for path in sorted((FLOWERS / name).glob("*.jpg"))[:per_class]:
            shutil.copy2(path, photos / name / path.name)
    root.mkdir()
    logs.mkdir()
    copy_repo(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(photos), sha256="")
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(folder / "keras")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "small"]):
        run(cmd, root, env, logs / "git.log")
    return root, photos, env, logs


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Project:
    """The real five-stage `dvc repro` on ../shared/data/flowers with the default params."""
    require_shared()
    base = tmp_path_factory.mktemp("e2e")
    root = base / "project"
    root.mkdir()
    copy_repo(root)
    keras_home = keras_home_with_weights(base / "keras")

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["source"] = str(FLOWERS)
    params["data"]["sha256"] = ""
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = project_env(keras_home)
    logs = base / "logs"
    logs.mkdir()
    run(["git", "init", "-q", "-b", "main"], root, env, logs / "git-init.log")
    run(["git", "add", "-A"], root, env, logs / "git-add.log")
    run(["git", "commit", "-qm", "graftline under test"], root, env, logs / "git-commit.log")
    repro_log = run(["dvc", "repro"], root, env, logs / "repro.log")

    first = base / "first-run"
    for rel in SNAPSHOT:
        src, dst = root / rel, first / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    run(["git", "add", "-A"], root, env, logs / "git-add-2.log")
    run(["git", "commit", "-qm", "first dvc repro"], root, env, logs / "git-commit-2.log")
    return Project(root, first, env, repro_log)


@pytest.fixture(scope="session")
def tfx_run(project: Project) -> Path:
    """`graftline tfx-run` with the first run's params; returns its root (metadata.sqlite, latest.json)."""
    root = project.root.parent / "tfx"
    # The first run's params but no TFLite: its agreement was checked there, and conversions take seconds.
    params = yaml.safe_load((project.first / "params.yaml").read_text())
    params["export"]["tflite"] = []
    (root.parent / "tfx-params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["graftline", "--params", str(root.parent / "tfx-params.yaml"), "tfx-run", "--root", str(root)],
        project.root, project.env, project.root.parent / "logs" / "tfx-run.log")
    return root
