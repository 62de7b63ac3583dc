"""Ingest at the edges of a photo folder: empty class folders, symbolic links, very large photos.

Issue 24, items 4-6: an empty class folder is ignored by ingest as DVC ignores it; a link is resolved
before anything is read and refused when it leaves the photo folder; a 200-megapixel JPEG is checked in
draft mode (decoded at 1/8 size), and photos above data.max_pixels are skipped with the reason.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from components.errors import GraftlineError
from components.photos import check_image
from conftest import FLOWERS, copy_repo, project_env, require_shared, run
from drawing import draw_photo, make_class_tree
from test_ingest import make_params, read_examples, run_ingest

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
# Issue 24: checking a 200-megapixel JPEG (600 MB as RGB) must peak below this.
PEAK_LIMIT = 500 * MB


def keys_of(outputs: dict) -> dict[str, str]:
    """key -> class name of every record ingest wrote."""
    return {r.key: r.label_name for recs in read_examples(outputs["examples"]).values() for r in recs}


def finishes(fn, seconds: float):
    """fn() in a thread; fails (rather than hangs the suite) when it runs past ``seconds``."""
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a link loop followed?)"
    assert "result" in done, "raised in the thread (see the output above)"
    return done["result"]


# ---------------------------------------------------------------- 4. empty class folders


def test_empty_class_folders_are_ignored_with_a_note_and_change_nothing(tmp_path):
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    _, before = run_ingest(make_params(tree), tmp_path / "before")
    (tree / "aardvarks").mkdir()  # sorts first: were it a class, every label would move
    (tree / "owls" / "sub").mkdir(parents=True)  # only an empty folder inside
    (tree / "bats").mkdir()
    (tree / "bats" / ".DS_Store").write_bytes(b"\0\1")  # only a hidden file: nothing ingest reads
    result, after = run_ingest(make_params(tree), tmp_path / "after")

    note = "empty folder: not a class (DVC does not see empty folders)"
    assert result["ignored"] == [{"path": name, "reason": note} for name in ("aardvarks", "bats", "owls")]
    assert json.loads(after["labels"].read_text()) == ["cats", "dogs"]
    assert after["labels"].read_bytes() == before["labels"].read_bytes()
    old = json.loads(before["report"].read_text())
    for key in ("num_classes", "num_examples", "splits", "classes", "skipped", "links"):
        assert result[key] == old[key], key
    for shard in sorted(before["examples"].iterdir()):
        assert (after["examples"] / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_a_class_folder_of_unreadable_files_is_not_empty_but_an_error(tmp_path):
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    (tree / "owls").mkdir()
    (tree / "owls" / "notes.txt").write_text("to photograph\n")
    with pytest.raises(GraftlineError, match="class 'owls' has 0 usable photo"):
        run_ingest(make_params(tree), tmp_path)


def test_dvc_and_ingest_agree_on_an_empty_class_folder(tmp_path):
    """Real `dvc` in a temporary git repo: an empty folder added, `dvc status` finds ingest up to date, and
    `graftline ingest` run anyway writes the same labels and examples (and notes the folder)."""
    root = tmp_path / "project"
    root.mkdir()
    copy_repo(root)
    photos = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(photos), sha256="", url="", val_percent=25, test_percent=25)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env, logs = project_env(tmp_path / "keras"), tmp_path / "logs"
    logs.mkdir()
    for i, cmd in enumerate((["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                             ["git", "commit", "-qm", "edges"], ["dvc", "repro", "ingest"])):
        run(cmd, root, env, logs / f"{i}.log")
    labels = (root / "artifacts" / "labels.json").read_bytes()
    shards = {p.name: p.read_bytes() for p in (root / "artifacts" / "examples").iterdir()}

    (photos / "aardvarks").mkdir()
    status = json.loads(run(["dvc", "status", "--json", "ingest"], root, env, logs / "status.log"))
    assert status == {}, status  # DVC does not see the folder
    run(["graftline", "ingest"], root, env, logs / "ingest.log")
    assert (root / "artifacts" / "labels.json").read_bytes() == labels
    assert {p.name: p.read_bytes() for p in (root / "artifacts" / "examples").iterdir()} == shards
    report = json.loads((root / "reports" / "ingest.json").read_text())
    assert [i["path"] for i in report["ignored"]] == ["aardvarks"]


# ---------------------------------------------------------------- 5. symbolic links


def outside_photos(folder: Path) -> dict[str, Path]:
    """Things outside the photo folder that links point at: a real photo, a folder of photos, a FIFO."""
    folder.mkdir()
    fifo = folder / "fifo.jpg"
    os.mkfifo(fifo)  # opening it blocks until a writer comes: an implementation that reads it hangs
    return {"photo": draw_photo(folder / "secret.jpg", (5, 5, 5), seed=501).resolve(),
            "folder": (make_class_tree(folder / "more", {"x": 3}) / "x").resolve(), "fifo": fifo.resolve()}


def test_links_leaving_the_photo_folder_are_refused_and_never_read(tmp_path):
    outside = outside_photos(tmp_path / "outside")
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    (tree / "cats" / "secret.jpg").symlink_to(outside["photo"])  # absolute
    (tree / "cats" / "up.jpg").symlink_to(Path("..", "..", "outside", "secret.jpg"))  # relative, through ..
    (tree / "cats" / "more").symlink_to(outside["folder"], target_is_directory=True)
    (tree / "dogs" / "pipe.jpg").symlink_to(outside["fifo"])
    (tree / "dogs" / "hop.jpg").symlink_to(tree / "cats" / "secret.jpg")  # inside, to a link that leaves
    (tree / "wolves").symlink_to(outside["folder"], target_is_directory=True)  # a class folder that leaves
    (tree / "cats" / "gone.jpg").symlink_to("nowhere.jpg")

    # Had ingest opened the FIFO, this writer would let it go on, and mark it read.
    read = threading.Event()

    def unblock():
        try:
            fd = os.open(outside["fifo"], os.O_WRONLY | os.O_NONBLOCK)  # fails when no reader waits
        except OSError:
            return
        read.set()
        os.close(fd)

    timer = threading.Timer(20, unblock)
    timer.start()
    try:
        result, outputs = finishes(lambda: run_ingest(make_params(tree), tmp_path / "work"), 60)
    finally:
        timer.cancel()
    assert not read.is_set(), "the FIFO outside the photo folder was opened"

    left = "outside the photo folder: not read"
    assert {s["path"]: s["reason"] for s in result["skipped"]} == {
        "cats/gone.jpg": "broken link (to nowhere.jpg)",
        "cats/more": f"link to {outside['folder']}, {left}",
        "cats/secret.jpg": f"link to {outside['photo']}, {left}",
        "cats/up.jpg": f"link to {outside['photo']}, {left}",
        "dogs/hop.jpg": f"link to {outside['photo']}, {left}",
        "dogs/pipe.jpg": f"link to {outside['fifo']}, {left}",
        "wolves": f"link to {outside['folder']}, {left}",
    }
    assert json.loads(outputs["labels"].read_text()) == ["cats", "dogs"]
    assert sorted(keys_of(outputs)) == [f"{c}/{c}_{i:03d}.jpg" for c in ("cats", "dogs") for i in range(10)]
    assert result["num_examples"] == 20 and result["links"] == []
    secret = outside["photo"].read_bytes()
    assert all(secret != r.image for recs in read_examples(outputs["examples"]).values() for r in recs)


def test_links_inside_the_folder_are_listed_and_each_file_read_once(tmp_path):
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    cats, dogs = tree / "cats", tree / "dogs"
    (cats / "alias.jpg").symlink_to("cats_001.jpg")  # the same file, twice in one class
    (cats / "from_dogs.jpg").symlink_to(Path("..", "dogs", "dogs_007.jpg"))  # a dog photo, linked from cats
    draw_photo(tree / ".stash" / "extra.jpg", (1, 200, 1), seed=301)  # a hidden folder: no class
    draw_photo(tree / ".stash" / "extra2.jpg", (1, 200, 2), seed=302)
    (cats / "extra.jpg").symlink_to(tree / ".stash" / "extra.jpg")  # absolute, inside: followed
    (cats / "stash").symlink_to(Path("..", ".stash"), target_is_directory=True)  # and the whole folder
    (dogs / "cats_too").symlink_to(cats, target_is_directory=True)  # a folder walked already
    (tree / "kitties").symlink_to("cats", target_is_directory=True)  # a class folder's alias: not a class
    result, outputs = run_ingest(make_params(tree), tmp_path / "work")

    assert result["links"] == [
        {"path": "cats/alias.jpg", "to": "cats/cats_001.jpg", "note": "same file as cats/cats_001.jpg: read once"},
        {"path": "cats/extra.jpg", "to": ".stash/extra.jpg", "note": "followed"},
        {"path": "cats/from_dogs.jpg", "to": "dogs/dogs_007.jpg", "note": "same file as dogs/dogs_007.jpg: read once"},
        {"path": "cats/stash", "to": ".stash", "note": "followed"},
        {"path": "cats/stash/extra.jpg", "to": ".stash/extra.jpg", "note": "same file as cats/extra.jpg: read once"},
        {"path": "dogs/cats_too", "to": "cats", "note": "same folder as cats: walked once"},
        {"path": "kitties", "to": "cats", "note": "same folder as cats: walked once"},
    ]
    assert json.loads(outputs["labels"].read_text()) == ["cats", "dogs"]
    found = keys_of(outputs)
    # A file met directly and through links is one photo, under its direct path and class.
    assert found["dogs/dogs_007.jpg"] == "dogs" and "cats/from_dogs.jpg" not in found
    assert "cats/alias.jpg" not in found and found["cats/cats_001.jpg"] == "cats"
    # Files only links reach are photos of the class folder the link lies in.
    assert found["cats/extra.jpg"] == found["cats/stash/extra2.jpg"] == "cats"
    assert len(found) == result["num_examples"] == 22
    # Nothing counted twice, so no duplicate or label conflict from a link.
    assert result["duplicates"] == [] and result["label_conflicts"] == [] and result["skipped"] == []


def test_link_loops_are_listed_and_never_hang(tmp_path):
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    (tree / "cats" / "self").symlink_to(".", target_is_directory=True)
    (tree / "cats" / "root").symlink_to("..", target_is_directory=True)
    (tree / "dogs" / "deep" / "er").mkdir(parents=True)
    (tree / "dogs" / "deep" / "er" / "back").symlink_to(Path("..", ".."), target_is_directory=True)
    (tree / "dogs" / "ping.jpg").symlink_to("pong.jpg")
    (tree / "dogs" / "pong.jpg").symlink_to("ping.jpg")
    (tree / "all").symlink_to(".", target_is_directory=True)  # the photo folder itself, as a class
    source = tmp_path / "photos-link"
    source.symlink_to(tree, target_is_directory=True)  # data.source may itself be a link
    result, outputs = finishes(lambda: run_ingest(make_params(source), tmp_path / "work"), 60)

    loop = "link loop: not followed"
    assert result["links"] == [
        {"path": "all", "to": ".", "note": loop},
        {"path": "cats/root", "to": ".", "note": loop},
        {"path": "cats/self", "to": "cats", "note": loop},
        {"path": "dogs/deep/er/back", "to": "dogs", "note": loop},
        {"path": "dogs/ping.jpg", "to": "pong.jpg", "note": loop},
        {"path": "dogs/pong.jpg", "to": "ping.jpg", "note": loop},
    ]
    assert json.loads(outputs["labels"].read_text()) == ["cats", "dogs"]
    assert result["num_examples"] == 20 and result["skipped"] == [] and result["duplicates"] == []


def test_a_fifo_in_a_class_folder_is_skipped_not_opened(tmp_path):
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    os.mkfifo(tree / "cats" / "pipe.jpg")
    result, _ = finishes(lambda: run_ingest(make_params(tree), tmp_path / "work"), 60)
    assert result["skipped"] == [{"path": "cats/pipe.jpg", "reason": "not a regular file"}]
    assert result["num_examples"] == 20


# ---------------------------------------------------------------- 6. large photos


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory) -> dict[str, Path]:
    """A 200-megapixel JPEG (16000 x 12500), upright and with EXIF orientation 6, made in a child process:
    building it takes 600 MB there, which this process's peak must not count."""
    folder = tmp_path_factory.mktemp("big")
    code = (
        "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = None\n"
        "image = Image.new('RGB', (16000, 12500), (40, 120, 200))\n"
        "image.paste((220, 200, 30), (0, 0, 16000, 2000))  # a yellow band along the top edge, as stored\n"
        "image.save(sys.argv[1] + '/upright.jpg', quality=85)\n"
        "exif = Image.Exif(); exif[0x0112] = 6\n"
        "image.save(sys.argv[1] + '/rotated.jpg', quality=85, exif=exif)\n")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, timeout=300)
    return {"upright": folder / "upright.jpg", "rotated": folder / "rotated.jpg"}


BLUE, YELLOW = (40, 120, 200), (220, 200, 30)  # the big JPEGs' colours (big_jpegs)


def close(pixel, colour) -> bool:
    return max(abs(a - b) for a, b in zip(pixel, colour)) <= 4  # JPEG's rounding on flat colour


# The peak resident memory of the process it runs in, C allocations included. Not ru_maxrss: Linux carries
# the parent's peak over exec into it, and a pytest worker's is already above 500 MB.
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) * 1024"


def peak_of(call: str, path: Path) -> dict:
    """Run ``call`` (an expression over ``data``, the file's bytes) in a fresh process, warnings as errors;
    its value and the process's peak resident memory."""
    code = (
        "import json, sys, warnings\n"
        "warnings.simplefilter('error')  # a DecompressionBombWarning would fail the call\n"
        "from components.photos import check_image, reencoded\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    data = f.read()\n"
        f"value = {call}\n"
        "if isinstance(value, bytes):\n"
        "    import io\n"
        "    from PIL import Image\n"
        "    Image.MAX_IMAGE_PIXELS = None  # the result may be large: measure it, do not refuse it\n"
        "    with Image.open(io.BytesIO(value)) as image:\n"
        "        rgb = image.convert('RGB')\n"
        "        value = [image.format, *image.size, rgb.getpixel((rgb.width // 2, 10)),\n"
        "                 rgb.getpixel((rgb.width - 10, rgb.height // 2))]\n"
        f"print(json.dumps({{'value': value, 'peak': {PEAK}}}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_checking_a_200_megapixel_jpeg_stays_under_500_mb(big_jpegs):
    for name, reencode in (("upright", False), ("rotated", True)):
        found = peak_of("check_image(data, max_pixels=250_000_000)", big_jpegs[name])
        assert found["value"] == [reencode, ""], name  # usable: a rotated photo is re-encoded upright
        assert found["peak"] < PEAK_LIMIT, f"{name}: {found['peak'] / MB:.0f} MB"


def test_reencoding_a_200_megapixel_jpeg_stays_under_500_mb_and_keeps_it_upright(big_jpegs):
    found = peak_of("reencoded(data, max_pixels=250_000_000)", big_jpegs["rotated"])
    assert found["peak"] < PEAK_LIMIT, f"{found['peak'] / MB:.0f} MB"
    kind, width, height, top_middle, right_middle = found["value"]
    # Draft mode decoded it at 1/4 (16000x12500 -> 4000x3125, REENCODE_MIN_SIDE 2048), then it was turned
    # upright: 3125 wide, 4000 high, and the band stored along the top now runs down the right edge.
    assert (kind, width, height) == ("PNG", 3125, 4000)
    assert close(top_middle, BLUE) and close(right_middle, YELLOW)
    kind, width, height, top_middle, right_middle = peak_of("reencoded(data, max_pixels=250_000_000)",
                                                            big_jpegs["upright"])["value"]
    assert (kind, width, height) == ("PNG", 4000, 3125)
    assert close(top_middle, YELLOW) and close(right_middle, BLUE)  # the band still on top


def test_a_photo_above_max_pixels_is_skipped_with_the_reason_not_a_warning(big_jpegs, tmp_path):
    import warnings

    from PIL import Image

    data = big_jpegs["upright"].read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verdict = check_image(data)  # predict's check: the default limit, data.max_pixels' default
    assert verdict == (False, "16000x12500 pixels (200.0 MP) is above data.max_pixels = 100000000; downscale "
                              "the photo or raise data.max_pixels")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert check_image(data, max_pixels=199_999_999)[1].startswith("16000x12500 pixels")
    # In ingest: skipped, the reason in the report, the other photos ingested.
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    shutil.copy(big_jpegs["upright"], tree / "cats" / "huge.jpg")
    result, _ = run_ingest(make_params(tree), tmp_path / "work")
    assert result["skipped"] == [{"path": "cats/huge.jpg", "reason": verdict[1]}]
    assert result["num_examples"] == 20


def test_ingest_of_a_200_megapixel_jpeg_within_the_limit_stays_under_500_mb_and_stores_it_as_is(big_jpegs,
                                                                                             tmp_path):
    tree = make_class_tree(tmp_path / "photos", {"cats": 10, "dogs": 10})
    shutil.copy(big_jpegs["upright"], tree / "cats" / "huge.jpg")
    work = tmp_path / "work"
    code = (
        "import json, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from test_ingest import make_params, run_ingest\n"
        "result, _ = run_ingest(make_params(sys.argv[1], max_pixels=250_000_000), Path(sys.argv[2]))\n"
        f"print(json.dumps({{'skipped': result['skipped'], 'n': result['num_examples'], 'peak': {PEAK}}}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tree), str(work)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["skipped"] == [] and found["n"] == 21
    assert found["peak"] < PEAK_LIMIT, f"{found['peak'] / MB:.0f} MB"
    stored = {r.key: r.image for recs in read_examples(work / "artifacts" / "examples").values() for r in recs}
    assert stored["cats/huge.jpg"] == big_jpegs["upright"].read_bytes()  # the original bytes, not a draft


def test_draft_checks_give_full_decodes_verdict_on_real_photos_whole_and_truncated():
    """The check decodes JPEGs at 1/8 size: on the shared flower photos, whole and cut short, it must accept
    and refuse exactly what a full-size decode does."""
    from PIL import Image

    require_shared()

    def full_verdict(data: bytes) -> bool:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
            return True
        except (OSError, SyntaxError, ValueError):
            return False

    photos = sorted(FLOWERS.glob("*/*.jpg"))
    assert len(photos) >= 400
    refused = 0
    for path in photos:
        whole = path.read_bytes()
        for data in (whole, whole[: len(whole) * 3 // 4], whole[: len(whole) // 3]):
            usable = check_image(data)[1] == ""
            assert usable == full_verdict(data), (path, len(data))
            refused += not usable
    assert refused >= 2 * len(photos) * 0.9  # nearly every cut photo is refused (by both)
