"""Images in and out of the REST API. In: base64 only, with or without a `data:` prefix; a
string that looks like a URL or a file path is refused, never fetched or opened (the
sd-webui-controlnet local-file-read anti-pattern). Out: raw base64 PNG carrying the infotext."""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from pipelines import uploads
from pipelines.metadata import image_bytes_with_infotext

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = uploads.DEFAULT_MAX_PIXELS
    max_bytes: int = uploads.DEFAULT_MAX_BYTES
    fetch_urls: Callable[[str, int], bytes] | None = None  # set when URLs are allowed (api.fetch)

    @classmethod
    def from_settings(cls, settings, allow_urls: bool = False) -> "ImageLimits":
        from api.fetch import fetch

        return cls(max_pixels=int(getattr(settings, "max_upload_pixels", cls.max_pixels)),
                   max_bytes=int(getattr(settings, "max_upload_mb", cls.max_bytes / (1 << 20)) * (1 << 20)),
                   fetch_urls=fetch if allow_urls else None)


def decode_image(text: object, what: str = "image", limits: ImageLimits = ImageLimits()) -> Image.Image:
    """A base64 image (PNG/JPEG/WebP...) -> a loaded PIL image; ValueError with what to send."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be a base64-encoded image string")
    text = text.strip()
    if _URL.match(text):
        if limits.fetch_urls is None:
            raise ValueError(f"{what}: image URLs are not accepted; send the image as base64")
        try:
            data = limits.fetch_urls(text, limits.max_bytes)
            return uploads.decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    text = _DATA_URL.sub("", text, count=1)
    if text.startswith(("/", "./", "../", "~")) or re.match(r"^[A-Za-z]:[\\/]", text):
        raise ValueError(f"{what}: file paths are not accepted; send the image as base64")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    try:
        return uploads.decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Raw base64 PNG (no `data:` prefix) with the infotext in its `parameters` chunk."""
    return base64.b64encode(image_bytes_with_infotext(image, infotext, "png")).decode("ascii")
