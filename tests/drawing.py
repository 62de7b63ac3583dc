"""Helpers that draw the tests' own photos with PIL and NumPy (not a test module).

Every drawn photo has a distinctive pattern (a class colour, a diagonal bar
whose position depends on ``seed`` and a little seeded noise), so two photos
drawn with different seeds never have the same bytes and ingest never takes
them for duplicates.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Distinct class colours (RGB), used in order by make_class_tree.
PALETTE = (
    (220, 40, 40),
    (40, 160, 60),
    (40, 70, 210),
    (230, 200, 30),
    (150, 60, 190),
    (30, 190, 200),
)

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP"}
EXIF_ORIENTATION = 0x0112


def pixels(color=(220, 40, 40), size=(32, 32), seed: int = 0, noise: int = 12) -> np.ndarray:
    """uint8 [height, width, 3]: ``color`` with a seeded bar and noise. ``size`` is (width, height) or an int."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.int16)
    image[:] = color
    # A diagonal bar at a seed-dependent offset, in the complementary colour.
    rows, cols = np.mgrid[0:height, 0:width]
    offset = seed % max(width, 1)
    bar = np.abs((cols - rows - offset) % max(width, 1)) < max(2, width // 8)
    image[bar] = 255 - np.asarray(color)
    if noise:
        image += rng.integers(-noise, noise + 1, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def solid(color, size=(32, 32)) -> np.ndarray:
    width, height = (size, size) if isinstance(size, int) else size
    image = np.empty((height, width, 3), np.uint8)
    image[:] = color
    return image


def encode(array: np.ndarray, fmt: str = "JPEG", exif_orientation: int | None = None) -> bytes:
    """uint8 [h, w, 3] -> encoded bytes in ``fmt`` (JPEG, PNG, GIF, BMP, WEBP)."""
    image = Image.fromarray(array, "RGB")
    kwargs = {}
    if fmt == "JPEG":
        kwargs["quality"] = 95
    if fmt == "WEBP":
        kwargs["lossless"] = True
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def draw_photo(path, color=(220, 40, 40), size=(32, 32), fmt: str | None = None, seed: int = 0,
               exif_orientation: int | None = None, array: np.ndarray | None = None) -> Path:
    """Write a photo to ``path`` (format from ``fmt`` or the suffix) and return the path."""
    path = Path(path)
    fmt = fmt or _FORMATS[path.suffix.lower()]
    if array is None:
        array = pixels(color, size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(array, fmt, exif_orientation))
    return path


def make_class_tree(root, counts: dict[str, int], size=(32, 32), suffix: str = ".jpg", start: int = 0) -> Path:
    """root/<class>/<class>_<i>.jpg for each class, ``counts[class]`` distinct photos each.

    ``start`` numbers the photos from there, so a second call adds new photos
    next to the old ones without touching them.
    """
    root = Path(root)
    for class_index, (name, count) in enumerate(counts.items()):
        color = PALETTE[class_index % len(PALETTE)]
        for i in range(start, start + count):
            draw_photo(root / name / f"{name}_{i:03d}{suffix}", color, size, seed=1000 * class_index + i)
    return root


def make_tar(archive, members: dict[str, bytes]) -> Path:
    """A .tar.gz holding ``members`` (name -> bytes) exactly as named, '../' included."""
    archive = Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return archive


def tree_members(root, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``root`` as archive members named ``prefix + relative path``."""
    root = Path(root)
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
