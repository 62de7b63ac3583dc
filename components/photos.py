"""Photo checks shared by ingest and predict: whether PIL can read a file, and the re-encoding that
makes any readable photo one TensorFlow decodes as a person sees it (upright, 8-bit RGB)."""
from __future__ import annotations

import io

# (format, PIL mode) pairs tf.io.decode_image reads correctly as they are; any
# other image (WebP, TIFF, CMYK JPEG, palette BMP, 16-bit PNG, ...) is re-encoded.
TF_NATIVE = {
    "JPEG": {"RGB", "L"},
    "PNG": {"RGB", "RGBA", "L", "LA", "P"},
    "GIF": {"P", "L", "RGB"},
    "BMP": {"RGB", "RGBA"},
}
EXIF_ORIENTATION = 0x0112


def check_image(data: bytes) -> tuple[bool, str]:
    """(reencode, reason): reason is '' for a usable image, else why it is skipped."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return False, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            native = image.mode in TF_NATIVE.get(image.format, ())
            image.load()  # decodes every pixel: catches truncated files
            oriented = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except UnidentifiedImageError:
        return False, "not an image"
    except Image.DecompressionBombError as exc:
        return False, f"image too large ({exc})"
    except (OSError, SyntaxError, ValueError) as exc:
        return False, f"corrupt or truncated image ({exc})"
    return not native or oriented, ""


def reencoded(data: bytes) -> bytes:
    """Images TF cannot decode as they are, or rotated by EXIF -> upright 8-bit RGB PNG."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16/32-bit integer greyscale: keep the top 8 bits
            depth = 16 if image.mode.startswith("I;16") or np.asarray(image).max() < 65536 else 32
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> (depth - 8)).astype(np.uint8))
        image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
