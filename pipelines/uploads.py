"""Decode uploaded image bytes with size and pixel limits.

PIL's own decompression-bomb guard is a module global (`Image.MAX_IMAGE_PIXELS`) that we do
not touch; instead the header is read first (Image.open is lazy) and the pixel count checked
before any pixel is decoded, so a 20000x20000 PNG of a few kilobytes is refused without
allocating its 1.2 GB."""
from __future__ import annotations

import io
import warnings

from PIL import Image

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 50 << 20
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    if len(data) > max_bytes:
        raise ValueError(f"the image is {len(data) >> 20} MB, above the {max_bytes >> 20} MB limit; send a smaller file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"the image has more than {max_pixels} pixels (a decompression bomb?); refused") from None
    except Exception:  # PIL raises many types for data that is not an image
        raise ValueError(f"the upload is not a readable image ({', '.join(FORMATS)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"the image is {width}x{height}, more than the {max_pixels} pixels this server "
                         "accepts; scale it down")
    try:
        image.load()
    except Exception:
        raise ValueError("the image data is damaged or truncated; re-export it") from None
    return image
