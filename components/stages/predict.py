"""`graftline predict`: the top classes of photos, from the exported SavedModel.

Photos go through ingest's checks (undecodable files are reported and
skipped; WebP, CMYK, EXIF-rotated photos are re-encoded exactly as ingest
stores them) and then, as raw bytes, through the SavedModel's ``serve``
signature, whose decode + resize is components/images.py's: the same path as
training and evaluation. That signature does not read EXIF (it expects upright
pixels: components/export.py), so turning rotated photos here is what gives a
phone photo the answer its upright pixels get.

A model folder with a file missing, cut short or not matching the others is one
line naming the folder and the file (exit 2), never a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from components import export
from components.errors import GraftlineError
from components.photos import check_image, reencoded


def photo_paths(targets: list[str]) -> Iterator[Path]:
    """Files named, and every non-hidden file under folders named, in sorted order."""
    for target in map(Path, targets):
        if target.is_dir():
            yield from (p for p in sorted(target.rglob("*"))
                        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(target).parts))
        elif target.is_file():
            yield target
        else:
            raise GraftlineError(f"{target}: no such file or folder")


def check(model_dir: Path, targets: list[str], max_pixels: int) -> tuple[list[dict], list[tuple[Path, bool, dict]]]:
    """The model folder's files (all there, labels.json readable), then every file through ingest's checks
    (``max_pixels``: data.max_pixels, read from the header), before TensorFlow or the model loads: one entry per
    file ({path} or {path, skipped: reason}) and the photos to predict (path, re-encode?, their entry)."""
    export.whole_folder_labels(Path(model_dir))
    results, photos = [], []
    for path in photo_paths(targets):
        reencode, reason = check_image(path.read_bytes(), max_pixels)
        results.append({"path": str(path), **({"skipped": reason} if reason else {})})
        if not reason:
            photos.append((path, reencode, results[-1]))
    return results, photos


def predict(model_dir: Path, photos: list[tuple[Path, bool, dict]], top_k: int) -> None:
    """Fill each checked photo's entry with its top classes: {class, probability}, best first.

    A model folder TensorFlow cannot load (a weights shard cut short), or whose labels.json does not match
    its outputs, fails with one line naming the folder and the damaged file (components/export.py)."""
    import tensorflow as tf

    labels = export.whole_folder_labels(Path(model_dir))
    serve = export.load_serve(Path(model_dir), labels)
    for path, reencode, entry in photos:
        data = path.read_bytes()
        # One photo per call, as evaluate runs them: a photo's probabilities do not depend on the others.
        p = serve(image_bytes=tf.constant([reencoded(data) if reencode else data]))["probabilities"].numpy()[0]
        best = np.argsort(-p, kind="stable")[:top_k]
        entry["top"] = [{"class": labels[i], "probability": round(float(p[i]), 6)} for i in best]


def require_some(results: list[dict], targets: list[str]) -> None:
    """Fail (one line) when nothing was predicted: no files at all, or none of them a photo."""
    if not results:
        raise GraftlineError(f"no files under {', '.join(targets)}: nothing to predict")
    if not any("top" in r for r in results):
        raise GraftlineError(f"nothing was predicted: {len(results)} file(s), none of them a photo "
                             "(each one's reason is listed above)")


def as_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['path']}: skipped ({r['skipped']})")
        else:
            lines.append(f"{r['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    return "\n".join(lines)
