"""Stage 1, ingest: a folder of class folders (or an archive) -> TFRecord shards per split.

Outputs: ``examples`` (folder of ``{split}-*.tfrecord.gz``), ``labels``
(labels.json: class names, index = label) and ``report`` (counts per class and
split, skipped files with reasons, duplicates, label conflicts, wall time).

The split of a photo is a hash of its path relative to the source (minus
anything after ``_nohash_`` in the file name, the retrainer's convention for
burst shots), so adding photos never moves old ones between splits.
"""
from __future__ import annotations

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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
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


def scan(root: Path, val_percent: float, test_percent: float, salt: str, workers: int = 1,
         label_conflicts: str = "drop"):
    """Walk the class folders: (class names, photos, skipped, duplicates, conflicts, ignored).

    The same photo bytes more than once: under one class, a duplicate (kept once, so test never
    sees a train photo); under several classes, a label conflict, which ``label_conflicts``
    decides: "drop" keeps no copy, "keep_first" keeps the first path's (sorted order).
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(Path(p.name)))
    ignored = [
        {"path": p.name, "reason": "not inside a class folder"}
        for p in sorted(root.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]
    files = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not _is_hidden(rel):
                files.append((rel.as_posix(), path, label))
    skipped, copies = [], {}  # copies: sha256 -> [(key, path, label, reencode)] in sorted key order
    checked = _check_files([str(path) for _, path, _ in files], workers)
    for (key, path, label), (digest, reencode, reason) in zip(
        files, tqdm(checked, total=len(files), desc="ingest: checking photos", unit="photo")
    ):
        if reason:
            skipped.append({"path": key, "reason": reason})
        else:
            copies.setdefault(digest, []).append((key, path, label, reencode))
    photos, duplicates, conflicts = [], [], []
    for digest, found in copies.items():
        first_key, path, label, reencode = found[0]
        if len({c[2] for c in found}) > 1:
            conflicts.append({"sha256": digest, "paths": [c[0] for c in found],
                              "classes": [classes[c[2]] for c in found],
                              "kept": first_key if label_conflicts == "keep_first" else None})
            if label_conflicts != "keep_first":
                continue
        else:
            duplicates += [{"path": c[0], "same_as": first_key} for c in found[1:]]
        photos.append(Photo(first_key, path, label, digest, split_of(first_key, val_percent, test_percent, salt),
                            reencode))
    photos.sort(key=lambda p: p.key)
    duplicates.sort(key=lambda d: d["path"])
    return classes, photos, skipped, duplicates, conflicts, ignored


def check_file(path: str) -> tuple[str, bool, str]:
    """(sha256, reencode, reason) of one file; only these few bytes go back to the parent."""
    data = Path(path).read_bytes()
    reencode, reason = check_image(data)
    return ("" if reason else hashlib.sha256(data).hexdigest()), reencode, reason


def _check_files(paths: list[str], workers: int) -> Iterator[tuple[str, bool, str]]:
    """check_file over all paths, in order, across ``workers`` processes (0 = one per core)."""
    workers = min(workers or os.cpu_count() or 1, -(-len(paths) // PHOTOS_PER_WORKER_MIN))
    done = 0
    if workers > 1:
        # spawn, not fork: the parent may already run TensorFlow's threads.
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for result in pool.map(check_file, paths, chunksize=16):
                    done += 1
                    yield result
        except BrokenProcessPool:
            # Workers could not start (e.g. a __main__ read from stdin cannot be re-imported):
            # finish in this process rather than hang or fail.
            print("ingest: parallel checking unavailable here; continuing in one process", file=sys.stderr)
    yield from map(check_file, paths[done:])


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
        if sum(counts.values()) < data.min_per_class:
            raise GraftlineError(
                f"class '{name}' has {sum(counts.values())} usable photo(s) in {root / name}; "
                f"data.min_per_class is {data.min_per_class}. Add photos or remove the folder."
            )
    split_counts = {s: sum(c[s] for c in per_class.values()) for s in records.SPLITS}
    for split, count in split_counts.items():
        if count == 0:
            raise GraftlineError(
                f"the {split} split is empty ({len(photos)} photos, data.val_percent={data.val_percent}, "
                f"data.test_percent={data.test_percent}); add photos or raise the percentages."
            )
    return per_class, split_counts


def write_examples(folder: Path, photos: list, classes: list[str], shard_size: int) -> None:
    """Every photo into gzip TFRecord shards, split by split, in key order; the folder appears when complete."""
    def load(photo: Photo) -> records.Record:
        image = photo.path.read_bytes()
        if photo.reencode:
            image = reencoded(image)
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
    # 2. Every photo checked (in parallel), deduplicated and given its split.
    classes, photos, skipped, duplicates, conflicts, ignored = scan(
        root, data.val_percent, data.test_percent, data.split_salt, data.workers, data.label_conflicts)
    # 3. Enough classes, and photos in every class and split.
    per_class, split_counts = counted(root, classes, photos, data)
    # 4. The TFRecord shards, then the labels and the report.
    write_examples(Path(outputs["examples"]), photos, classes, data.shard_size)
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
        "ignored": ignored,
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(Path(outputs["report"]), report)
    return report
