"""Photo checks shared by ingest and predict: whether PIL can read a file, and the re-encoding that
makes any readable photo one TensorFlow decodes as a person sees it (upright, 8-bit RGB).

Neither decodes a large JPEG at full size: JPEG's draft mode decodes at 1/2, 1/4 or 1/8 scale, so a
200-megapixel photo is checked in tens of MB, not the 600 MB of its full RGB pixels.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

# (format, PIL mode) pairs tf.io.decode_image reads correctly as they are; any
# other image (WebP, TIFF, CMYK JPEG, palette BMP, 16-bit PNG, ...) is re-encoded.
TF_NATIVE = {
    "JPEG": {"RGB", "L"},
    "PNG": {"RGB", "RGBA", "L", "LA", "P"},
    "GIF": {"P", "L", "RGB"},
    "BMP": {"RGB", "RGBA"},
}
EXIF_ORIENTATION = 0x0112
# data.max_pixels' default (pipeline/params.py), and predict's limit: 100 MP decode to 300 MB of RGB.
MAX_PIXELS = 100_000_000
# The check asks draft mode for the smallest scale (1/8): libjpeg still entropy-decodes every block, so a
# truncated or corrupt file fails as at full size.
CHECK_DRAFT_SIZE = (1, 1)
# A re-encoded JPEG keeps at least this many pixels a side (draft mode halves a 50-MP photo, keeps 12 MP
# ones whole); the model sees at most a few hundred.
REENCODE_MIN_SIDE = 2048
SMALLER = "downscale the photo or raise data.max_pixels"


@contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's decompression-bomb guard at our limit instead of its own (a warning above 89 MP, an error above
    179 MP, whatever data.max_pixels says). It is a module global, so it is set for this call only."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns between max_pixels and twice it; the size check below turns that into a skip.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[bool, str]:
    """(reencode, reason): reason is '' for a usable image, else why it is skipped."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return False, "empty file"
    try:
        with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:  # read from the header: nothing decoded yet
                size = f"{image.width}x{image.height} pixels ({image.width * image.height / 1e6:.1f} MP)"
                return False, f"{size} is above data.max_pixels = {max_pixels}; {SMALLER}"
            native = image.mode in TF_NATIVE.get(image.format, ())
            image.draft(image.mode, CHECK_DRAFT_SIZE)  # JPEG only; other formats ignore it
            image.load()  # decodes every pixel (of the draft): catches truncated files
            oriented = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except UnidentifiedImageError:
        return False, "not an image"
    except Image.DecompressionBombError:  # over twice max_pixels, refused by PIL as it opened the file
        return False, f"more than {2 * max_pixels} pixels, above data.max_pixels = {max_pixels}; {SMALLER}"
    except (OSError, SyntaxError, ValueError) as exc:
        return False, f"corrupt or truncated image ({exc})"
    return not native or oriented, ""


def reencoded(data: bytes, max_pixels: int = MAX_PIXELS) -> bytes:
    """Images TF cannot decode as they are, or rotated by EXIF -> upright 8-bit RGB PNG.

    A JPEG of more than twice REENCODE_MIN_SIDE a side is decoded, and stored, at 1/2 to 1/8 of its size."""
    import numpy as np
    from PIL import Image, ImageOps

    with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:
        image.draft(image.mode, (REENCODE_MIN_SIDE, REENCODE_MIN_SIDE))
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16/32-bit integer greyscale: keep the top 8 bits
            depth = 16 if image.mode.startswith("I;16") or np.asarray(image).max() < 65536 else 32
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> (depth - 8)).astype(np.uint8))
        image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
