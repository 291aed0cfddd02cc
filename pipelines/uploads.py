"""Decode uploaded image bytes with size and pixel limits.

PIL's own decompression-bomb guard is a module global (`Image.MAX_IMAGE_PIXELS`) that we do
not touch; instead the header is read first (Image.open is lazy) and the pixel count checked
before any pixel is decoded, so a 20000x20000 PNG of a few kilobytes is refused without
allocating its 1.2 GB."""
from __future__ import annotations

import io

from PIL import Image

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 50 << 20
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def check_image_file(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Refuse a file that is too big, not an image, or has too many pixels, reading only its
    header (the pixels are decoded later by whoever uses it)."""
    import os

    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"the image is {size >> 20} MB, above the {max_bytes >> 20} MB limit; send a smaller file")
    with open(path, "rb") as handle:
        _open_checked(handle, max_pixels).close()


def _open_checked(stream, max_pixels: int) -> Image.Image:
    try:
        # Image.open reads only the header. PIL raises DecompressionBombError past twice its
        # own global limit; below that our max_pixels check refuses before any decoding.
        image = Image.open(stream, formats=FORMATS)
    except Image.DecompressionBombError:
        raise ValueError(f"the image has more than {max_pixels} pixels (a decompression bomb?); refused") from None
    except Exception:  # PIL raises many types for data that is not an image
        raise ValueError("the upload is not a readable image (PNG, JPEG or WebP)") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ValueError(f"the image is {width}x{height}, more than the {max_pixels} pixels this server "
                         "accepts; scale it down")
    return image


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    if len(data) > max_bytes:
        raise ValueError(f"the image is {len(data) >> 20} MB, above the {max_bytes >> 20} MB limit; send a smaller file")
    image = _open_checked(io.BytesIO(data), max_pixels)
    try:
        image.load()
    except Exception:
        raise ValueError("the image data is damaged or truncated; re-export it") from None
    return image
