"""DVC sees the photos: data.source is a dependency of ingest, hashed by DVC itself.

A small real project (three classes of shared flower photos copied into a
temporary folder, MobileNetV2 alpha 0.35 at 96 px), real `dvc` in a temporary
git repo, up to the bottleneck stage: adding, removing or editing a photo makes
`dvc status` report ingest changed, and `dvc repro` re-runs ingest and only
what its new outputs change.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import FLOWERS, SHARED, copy_repo, require_shared, run, small_dvc_project

pytestmark = pytest.mark.e2e

WEIGHTS_035 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
CLASSES = ("daisy", "roses", "tulips")
PER_CLASS = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(project root, photo folder, env, log folder) after `dvc repro bottleneck` on 24 photos."""
    require_shared()
    root, photos, env, logs = small_dvc_project(
        tmp_path_factory.mktemp("dvc-source"), CLASSES, PER_CLASS, data={"val_percent": 25, "test_percent": 25},
        base={"alpha": 0.35, "image_size": 96, "weights": str(WEIGHTS_035)})
    run(["dvc", "repro", "bottleneck"], root, env, logs / "repro-1.log")
    return root, photos, env, logs


def status(root: Path, env: dict, logs: Path) -> dict:
    """`dvc status --json` of bottleneck and the stages before it."""
    return json.loads(run(["dvc", "status", "--json", "--with-deps", "bottleneck"], root, env, logs / "status.log"))


def ingest_source_change(found: dict, photos: Path) -> str | None:
    """How `dvc status` says the photo folder changed for ingest ('modified', ...), or None."""
    for entry in found.get("ingest", []):
        if isinstance(entry, dict) and "changed deps" in entry:
            return entry["changed deps"].get(str(photos))
    return None


def repro(root: Path, env: dict, logs: Path, name: str) -> tuple[set, set]:
    out = run(["dvc", "repro", "bottleneck"], root, env, logs / f"{name}.log")
    return set(re.findall(r"Running stage '(\w+)'", out)), set(re.findall(r"Stage '(\w+)' didn't change", out))


def test_an_untouched_folder_is_up_to_date(small):
    root, _, env, logs = small
    assert status(root, env, logs) == {}


def test_a_photo_added_reruns_ingest_and_one_forward_pass(small):
    root, photos, env, logs = small
    new = sorted((FLOWERS / "roses").glob("*.jpg"))[PER_CLASS]
    shutil.copy2(new, photos / "roses" / new.name)
    assert ingest_source_change(status(root, env, logs), photos) == "modified"
    ran, _ = repro(root, env, logs, "repro-added")
    assert {"ingest", "bottleneck"} <= ran
    report = json.loads((root / "reports" / "bottleneck.json").read_text())
    assert report["forward_passes"] == 1 and report["cache"]["hits"] == len(CLASSES) * PER_CLASS
    assert json.loads((root / "reports" / "ingest.json").read_text())["num_examples"] == len(CLASSES) * PER_CLASS + 1
    assert status(root, env, logs) == {}


def test_a_file_ingest_skips_reruns_ingest_but_not_the_bottleneck(small):
    root, photos, env, logs = small
    (photos / "daisy" / "notes.txt").write_text("where these were taken\n")
    assert ingest_source_change(status(root, env, logs), photos) == "modified"
    ran, skipped = repro(root, env, logs, "repro-notes")
    assert "ingest" in ran and "bottleneck" in skipped and "bottleneck" not in ran
    skipped_files = json.loads((root / "reports" / "ingest.json").read_text())["skipped"]
    assert {"path": "daisy/notes.txt", "reason": "not an image"} in skipped_files


def test_a_photo_removed_or_edited_is_a_change(small):
    root, photos, env, logs = small
    removed = sorted((photos / "tulips").glob("*.jpg"))[0]
    kept = removed.read_bytes()
    removed.unlink()
    assert ingest_source_change(status(root, env, logs), photos) == "modified"
    removed.write_bytes(kept)
    assert status(root, env, logs) == {}  # the same bytes back: DVC hashes content
    edited = sorted((photos / "daisy").glob("*.jpg"))[0]
    edited.write_bytes(edited.read_bytes() + b"\0")  # same photo, one byte more: a JPEG reader ignores it
    assert ingest_source_change(status(root, env, logs), photos) == "modified"


def test_a_url_source_is_tracked_by_its_pinned_sha256(small, tmp_path):
    """The default params: DVC tracks data.url and data.sha256 (download) and a local file (ingest), no URL."""
    root, _, env, logs = small
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    copy_repo(fresh)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "fresh"]):
        run(cmd, fresh, env, logs / "git-fresh.log")
    found = json.loads(run(["dvc", "status", "--json", "ingest", "download"], fresh, env, logs / "fresh.log"))
    ingest_deps = next(e["changed deps"] for e in found["ingest"] if isinstance(e, dict) and "changed deps" in e)
    assert ingest_deps.get("data/download/flower_photos.tgz") == "deleted"
    assert not any("://" in dep for dep in ingest_deps)
    stage = yaml.safe_load((fresh / "dvc.yaml").read_text())["stages"]["download"]
    assert {"data.url", "data.sha256"} <= set(stage["params"])
