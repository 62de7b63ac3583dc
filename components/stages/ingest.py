"""Stage 1, ingest: a folder of class folders (or an archive) -> TFRecord shards per split.

Outputs: ``examples`` (folder of ``{split}-*.tfrecord.gz``), ``labels``
(labels.json: class names, index = label) and ``report`` (counts per class and
split, skipped files with reasons, duplicates, label conflicts, links, ignored
files and empty class folders, wall time).

The split of a photo is a hash of its path relative to the source (minus
anything after ``_nohash_`` in the file name, the retrainer's convention for
burst shots), so adding photos never moves old ones between splits.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Iterator

from tqdm import tqdm

from components import records
from components.atomic import atomic_dir, write_json
from components.fetch import USE_A_FOLDER, fetch_source, sha256_of
from components.errors import GraftlineError
from components.photos import check_image, reencoded

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# Folders that archivers add beside the photos (macOS Finder's zip resource forks).
JUNK_FOLDERS = {"__MACOSX"}
# Folders of photos that a graftline command makes (the digits preset's), and that command.
MADE_BY = {"data/digits": "graftline pretrain-digits"}
# Below this many photos per extra process, starting it costs more than it saves.
PHOTOS_PER_WORKER_MIN = 200


@dataclass(frozen=True)
class Photo:
    key: str  # path relative to the source root, with forward slashes
    path: Path
    label: int
    sha256: str
    split: str
    reencode: bool  # stored as PNG because TF cannot decode it as it is


def split_of(key: str, val_percent: float, test_percent: float, salt: str = "") -> str:
    """Deterministic split from the relative path; stable when other photos come or go."""
    path = PurePosixPath(key)
    stem = re.sub(r"_nohash_.*$", "", path.name)
    hashed = str(path.parent / stem)
    digest = hashlib.sha1((salt + hashed).encode()).hexdigest()
    percent = int(digest[:15], 16) / 16**15 * 100
    if percent < val_percent:
        return "val"
    if percent < val_percent + test_percent:
        return "test"
    return "train"


def _is_hidden(rel: PurePosixPath | Path) -> bool:
    return any(part.startswith(".") or part in JUNK_FOLDERS for part in rel.parts)


def _safe_extract(archive: Path, target: Path) -> list[dict]:
    """Extract into ``target``; members that would escape it are reported, not written."""
    rejected = []

    def escapes(name: str) -> bool:
        p = PurePosixPath(name)
        return p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\"))

    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if escapes(info.filename) or (info.external_attr >> 28) == 0xA:  # symlink
                    rejected.append({"path": info.filename, "reason": "archive member escapes the target folder"})
                    continue
                if _is_hidden(PurePosixPath(info.filename)):
                    continue
                zf.extract(info, target)
        return rejected
    with tarfile.open(archive) as tf_:
        for member in tf_:
            if escapes(member.name) or not (member.isfile() or member.isdir()):
                rejected.append({"path": member.name, "reason": "archive member escapes the target folder or is a link/device"})
                continue
            tf_.extract(member, target, filter="data")
    return rejected


def _class_root(folder: Path) -> Path:
    """Descend through single wrapping folders (flower_photos.tgz holds flower_photos/<class>/), but not into
    a lone folder of photos: that is a class (an archive of one class)."""
    def subdirs(of: Path) -> list[Path]:
        return [p for p in of.iterdir() if p.is_dir() and not _is_hidden(Path(p.name))]

    while len(inner := subdirs(folder)) == 1 and subdirs(inner[0]):
        folder = inner[0]
    return folder


def resolve_source(data, downloads: Path, extract_dir: Path) -> tuple[Path, list[dict]]:
    """Return the folder of class folders for ``data.source`` and any rejected archive members.

    A data.source in ``downloads`` that is not there yet is downloaded from data.url first (the
    download stage does it under DVC; TFX and a bare ``graftline ingest`` come here without it).
    """
    source, sha256 = data.source, data.sha256
    archive = Path(source)
    if not archive.exists():
        fetch_source(data, downloads)
    if archive.is_dir():
        return archive, []
    if not archive.exists():
        made_by = next((cmd for folder, cmd in MADE_BY.items() if Path(source).is_relative_to(folder)), None)
        raise GraftlineError(f"data.source {source!r} does not exist. "
                             + (f"`{made_by}` makes it: run that first." if made_by else USE_A_FOLDER))
    if sha256 and sha256_of(archive) != sha256:
        raise GraftlineError(
            f"data.source {archive} has sha256 {sha256_of(archive)}, but data.sha256 pins {sha256}. "
            "Set data.sha256 to the new value if the archive changed on purpose, or '' for none."
        )
    if not archive.name.endswith(ARCHIVE_SUFFIXES):
        raise GraftlineError(
            f"data.source {source!r} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})."
        )
    digest = sha256 or sha256_of(archive)
    target = Path(extract_dir) / f"{archive.name.split('.')[0]}-{digest[:12]}"
    report = target.with_name(target.name + ".rejected.json")
    if not target.exists():  # extracted once; atomic so a killed run re-extracts
        try:
            with atomic_dir(target) as tmp:
                rejected = _safe_extract(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
            raise GraftlineError(
                f"data.source {archive} is a corrupt or incomplete archive ({type(exc).__name__}: {exc}). "
                "Download it again (remove the file; data.sha256 pins the right one), or point data.source "
                "at the folder of photos") from None
        write_json(report, rejected)
    return _class_root(target), json.loads(report.read_text())


@dataclass(frozen=True)
class Found:
    """A file met in a class folder: ``key`` is its path as met, ``real`` where it lies (links resolved)."""
    key: str
    real: Path
    cls: str
    is_link: bool  # the entry itself is a link
    via_link: bool  # a link on the way: the entry or a folder above it


@dataclass
class Walk:
    classes: list[str]  # sorted; empty class folders are not classes
    files: list[Found]  # each real file once, in sorted key order
    refused: list[dict]  # links leaving the folder, broken links, non-files: skipped, never read
    links: list[dict]  # links inside the folder and loops, with what each led to
    ignored: list[dict]  # files beside the class folders, empty class folders


def walk(root: Path) -> Walk:
    """Every visible file under ``root``'s class folders, each real file once.

    Links are resolved before anything is read: one that leaves ``root`` (or leads nowhere) is refused. A
    folder is walked once however many links lead to it, so a loop ends; a file met directly and through a
    link is one photo, under its direct path. Empty class folders are ignored, as DVC (which does not see
    empty folders) ignores them: a `dvc repro` that finds nothing changed and an ingest run agree.
    """
    top = root.resolve()
    out = Walk([], [], [], [], [])
    walked: dict[Path, str] = {}  # real folder -> the key it was walked as
    met: Counter = Counter()  # visible entries per class folder: none means an empty folder
    files: list[Found] = []
    folder_links: list[tuple[str, Path, str, Path]] = []  # (key, target, class, folder the link lies in)

    def shown(path: Path) -> str:
        return path.relative_to(top).as_posix() or "."

    def link(key: str, target: Path, note: str) -> None:
        out.links.append({"path": key, "to": shown(target), "note": note})

    def target_of(path: str, key: str) -> Path | None:
        """A link's real target inside ``top``, or None (refused, or a loop: reported)."""
        try:
            target = Path(os.path.realpath(path, strict=True))
        except OSError as exc:
            to = os.readlink(path)
            if exc.errno == errno.ELOOP:
                out.links.append({"path": key, "to": to, "note": "link loop: not followed"})
            else:
                reason = f"broken link (to {to})" if exc.errno == errno.ENOENT else f"link to {to}: {exc.strerror}"
                out.refused.append({"path": key, "reason": reason})
            return None
        if not target.is_relative_to(top):
            out.refused.append({"path": key, "reason": f"link to {target}, outside the photo folder: not read"})
            return None
        return target

    def walk_folder(folder: Path, key: str, cls: str, via_link: bool) -> None:
        walked[folder] = key
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            child = f"{key}/{entry.name}"
            if _is_hidden(PurePosixPath(entry.name)):
                continue
            if entry.is_dir(follow_symlinks=False):
                if Path(entry.path) not in walked:
                    walk_folder(Path(entry.path), child, cls, via_link)
                continue
            met[cls] += 1
            real, is_link = Path(entry.path), entry.is_symlink()
            if is_link:
                if (real := target_of(entry.path, child)) is None:
                    continue
                if real.is_dir():
                    folder_links.append((child, real, cls, folder))
                    continue
            if not (real.is_file() if is_link else entry.is_file(follow_symlinks=False)):
                out.refused.append({"path": child, "reason": "not a regular file"})  # a FIFO would hang a read
                continue
            files.append(Found(child, real, cls, is_link, via_link or is_link))

    # 1. The class folders themselves, then those that are links (a link to a class folder is not a class).
    classes: dict[str, Path] = {}
    class_links = []
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        if _is_hidden(PurePosixPath(entry.name)):
            continue
        if entry.is_dir(follow_symlinks=False):
            classes[entry.name] = Path(entry.path)
            continue
        if entry.is_symlink():
            if (target := target_of(entry.path, entry.name)) is None:
                continue
            if target.is_dir():
                class_links.append((entry.name, target))
                continue
        out.ignored.append({"path": entry.name, "reason": "not inside a class folder"})
    for name, folder in classes.items():
        walk_folder(folder, name, name, False)
    for name, target in class_links:
        if target == top:
            link(name, target, "link loop: not followed")
        elif target in walked:
            link(name, target, f"same folder as {walked[target]}: walked once")
        else:
            link(name, target, "followed")
            classes[name] = target
            walk_folder(target, name, name, True)
    # 2. Links to folders, once every folder met directly is walked: each folder is walked once.
    while folder_links:
        key, target, cls, at = folder_links.pop(0)
        if at.is_relative_to(target):
            link(key, target, "link loop: not followed")
        elif target in walked:
            link(key, target, f"same folder as {walked[target]}: walked once")
        else:
            link(key, target, "followed")
            walk_folder(target, key, cls, True)
    # 3. Each real file once: its direct path if it has one, else the first link's.
    by_real: dict[Path, list[Found]] = {}
    for found in files:
        by_real.setdefault(found.real, []).append(found)
    for same in by_real.values():
        first, *others = sorted(same, key=lambda f: (f.via_link, PurePosixPath(f.key)))
        out.files.append(first)
        if first.is_link:
            link(first.key, first.real, "followed")
        for other in others:
            link(other.key, other.real, f"same file as {first.key}: read once")
    out.files.sort(key=lambda f: PurePosixPath(f.key))  # part by part, as a sorted rglob lists them
    out.links.sort(key=lambda link: PurePosixPath(link["path"]))
    out.classes = sorted(name for name in classes if met[name])
    out.ignored += [{"path": name, "reason": "empty folder: not a class (DVC does not see empty folders)"}
                    for name in sorted(classes) if not met[name]]
    out.ignored.sort(key=lambda i: i["path"])
    return out


def scan(root: Path, data, exclude: frozenset[str] = frozenset()):
    """Walk and check the class folders, leaving out the photos ``exclude`` names (data.exclude's keys):
    (walk, photos, skipped, duplicates, conflicts).

    The same photo bytes more than once: under one class, a duplicate (kept once, so test never
    sees a train photo); under several classes, a label conflict, which ``data.label_conflicts``
    decides: "drop" keeps no copy, "keep_first" keeps the first path's (sorted order).
    """
    found = walk(root)
    labels = {name: label for label, name in enumerate(found.classes)}
    files = [f for f in found.files if f.key not in exclude]
    skipped, copies = [], {}  # copies: sha256 -> [(key, path, label, reencode)] in sorted key order
    checked = _check_files([str(f.real) for f in files], data.workers, data.max_pixels)
    for f, (digest, reencode, reason) in zip(
        files, tqdm(checked, total=len(files), desc="ingest: checking photos", unit="photo")
    ):
        if reason:
            skipped.append({"path": f.key, "reason": reason})
        else:
            copies.setdefault(digest, []).append((f.key, f.real, labels[f.cls], reencode))
    photos, duplicates, conflicts = [], [], []
    for digest, same in copies.items():
        first_key, path, label, reencode = same[0]
        if len({c[2] for c in same}) > 1:
            conflicts.append({"sha256": digest, "paths": [c[0] for c in same],
                              "classes": [found.classes[c[2]] for c in same],
                              "kept": first_key if data.label_conflicts == "keep_first" else None})
            if data.label_conflicts != "keep_first":
                continue
        else:
            duplicates += [{"path": c[0], "same_as": first_key} for c in same[1:]]
        split = split_of(first_key, data.val_percent, data.test_percent, data.split_salt)
        photos.append(Photo(first_key, path, label, digest, split, reencode))
    photos.sort(key=lambda p: p.key)
    duplicates.sort(key=lambda d: d["path"])
    skipped = sorted(skipped + found.refused, key=lambda s: PurePosixPath(s["path"]))
    return found, photos, skipped, duplicates, conflicts


def excluded_keys(path: Path, default: str) -> list[str]:
    """data.exclude's photo paths, one per line as ingest names them; blank lines and lines starting with # skipped.

    The default file missing (ingest run outside a graftline project, which commits it) excludes nothing.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if str(path) == default:
            return []
        raise GraftlineError(f"data.exclude: {path} not found; create it (one photo path per line, as ingest names "
                             "them: class/file.jpg; # comments) or point data.exclude at another file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GraftlineError(f"data.exclude: {path} is not a readable text file ({exc})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_photo(path: str | Path) -> bytes:
    """A file's bytes, never through a link: the walk resolved them all, so one here appeared since."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        return f.read()


def check_file(path: str, max_pixels: int) -> tuple[str, bool, str]:
    """(sha256, reencode, reason) of one file; only these few bytes go back to the parent."""
    try:
        data = read_photo(path)
    except OSError as exc:
        return "", False, f"unreadable ({exc.strerror})"
    reencode, reason = check_image(data, max_pixels)
    return ("" if reason else hashlib.sha256(data).hexdigest()), reencode, reason


def _check_files(paths: list[str], workers: int, max_pixels: int) -> Iterator[tuple[str, bool, str]]:
    """check_file over all paths, in order, across ``workers`` processes (0 = one per core)."""
    workers = min(workers or os.cpu_count() or 1, -(-len(paths) // PHOTOS_PER_WORKER_MIN))
    check = partial(check_file, max_pixels=max_pixels)
    done = 0
    if workers > 1:
        # spawn, not fork: the parent may already run TensorFlow's threads.
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for result in pool.map(check, paths, chunksize=16):
                    done += 1
                    yield result
        except BrokenProcessPool:
            # Workers could not start (e.g. a __main__ read from stdin cannot be re-imported):
            # finish in this process rather than hang or fail.
            print("ingest: parallel checking unavailable here; continuing in one process", file=sys.stderr)
    yield from map(check, paths[done:])


def photos_for_every_split(val_percent: float, test_percent: float, chance: float = 0.95) -> int:
    """Photos a class needs for every split to get one of them with ``chance`` (a union bound over splits)."""
    shares = [val_percent / 100, test_percent / 100, 1 - (val_percent + test_percent) / 100]
    n = 3
    while sum((1 - share) ** n for share in shares) > 1 - chance:
        n += 1
    return n


def counted(root: Path, classes: list[str], photos: list, data) -> tuple[dict, dict]:
    """(photos per class and split, photos per split), after checking there are enough to train on."""
    if len(classes) < 2:
        raise GraftlineError(
            f"data.source {root} has {len(classes)} class folder(s); graftline needs at least 2 "
            "(one sub-folder of photos per class)."
        )
    per_class = {name: {s: 0 for s in records.SPLITS} for name in classes}
    for photo in photos:
        per_class[classes[photo.label]][photo.split] += 1
    for name, counts in per_class.items():
        total = sum(counts.values())
        if total < data.min_per_class:
            raise GraftlineError(
                f"class '{name}' has {total} usable photo(s) in {root / name}; "
                f"data.min_per_class is {data.min_per_class}. Add photos or remove the folder."
            )
        # Val scores early stopping and test the model, so each must see every class (params: percent > 0).
        if missing := [s for s in records.SPLITS if counts[s] == 0]:
            raise GraftlineError(
                f"class '{name}' has no {' and no '.join(missing)} photo: its {total} photos split "
                + ", ".join(f"{s} {counts[s]}" for s in records.SPLITS)
                + " (a hash of each path decides). Every class needs a photo in each split: 3 at the least, "
                f"about {photos_for_every_split(data.val_percent, data.test_percent)} to make that likely with "
                f"data.val_percent={data.val_percent:g} and data.test_percent={data.test_percent:g}. Add photos "
                f"to {root / name}, raise data.val_percent or data.test_percent, or try another data.split_salt."
            )
    split_counts = {s: sum(c[s] for c in per_class.values()) for s in records.SPLITS}
    return per_class, split_counts


def write_examples(folder: Path, photos: list, classes: list[str], shard_size: int, max_pixels: int) -> None:
    """Every photo into gzip TFRecord shards, split by split, in key order; the folder appears when complete."""
    def load(photo: Photo) -> records.Record:
        image = read_photo(photo.path)
        if photo.reencode:
            image = reencoded(image, max_pixels)
        return records.Record(photo.key, photo.label, classes[photo.label], photo.sha256, image)

    with atomic_dir(folder) as tmp:
        with tqdm(total=len(photos), desc="ingest: writing TFRecords", unit="photo") as bar:
            for split in records.SPLITS:
                chosen = [p for p in photos if p.split == split]  # already sorted by key

                def stream(chosen=chosen):
                    for photo in chosen:
                        yield load(photo)
                        bar.update()

                records.write_shards(stream(), tmp, split, len(chosen), shard_size)


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: downloads (where data.url lands), extract_dir (archives extracted once). outputs: examples, labels,
    report."""
    started = time.time()
    data = params.data
    # 1. The photos' root: data.source's folder, or its archive extracted once.
    root, rejected = resolve_source(data, Path(inputs["downloads"]), Path(inputs["extract_dir"]))
    # 2. Every photo found (links resolved), checked in parallel, deduplicated and given its split.
    exclude = excluded_keys(Path(data.exclude), type(data)().exclude)
    found, photos, skipped, duplicates, conflicts = scan(root, data, frozenset(exclude))
    met = {f.key for f in found.files}
    # 3. Enough classes, and photos of every class in every split.
    classes = found.classes
    per_class, split_counts = counted(root, classes, photos, data)
    # 4. The TFRecord shards, then the labels and the report.
    write_examples(Path(outputs["examples"]), photos, classes, data.shard_size, data.max_pixels)
    write_json(Path(outputs["labels"]), classes)
    report = {
        "source": data.source,
        "source_root": str(root),
        "num_classes": len(classes),
        "num_examples": len(photos),
        "splits": split_counts,
        "classes": per_class,
        "reencoded": sum(p.reencode for p in photos),
        "num_skipped": len(skipped) + len(rejected),
        "num_duplicates": len(duplicates),
        "num_label_conflicts": len(conflicts),
        "skipped": skipped + rejected,
        "duplicates": duplicates,
        # The same photo under several classes (data.label_conflicts: drop keeps no copy).
        "label_conflicts": conflicts,
        # Files beside the class folders, and empty class folders (not classes).
        "ignored": found.ignored,
        # Links inside the photo folder and link loops; links that leave it are in "skipped".
        "links": found.links,
        # data.exclude's lines: the photos left out, and lines that name no photo here (a typo, or gone).
        "excluded": sorted(key for key in set(exclude) if key in met),
        "exclude_unmatched": sorted(key for key in set(exclude) if key not in met),
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(Path(outputs["report"]), report)
    return report
