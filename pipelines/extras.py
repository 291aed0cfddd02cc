"""Extras (A1111's postprocessing upscale): one image or a batch, upscaled by a factor or to a size
with upscaler 1, optionally blended with upscaler 2; the source's generation parameters are kept
and A1111's `postprocessing` text is added. Results go to outputs/extras-images."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, PngImagePlugin

from pipelines import uploads, upscalers
from pipelines.metadata import read_infotext
from pipelines.outputs import OutputStore, atomic_write_bytes, next_sequence_number

RESIZE_BY = "by"
RESIZE_TO = "to"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SIDE = 8192
MAX_BATCH = 1000
CATEGORY = "extras-images"


@dataclass(frozen=True)
class ExtrasOptions:
    """A1111's extras fields (API names)."""
    resize_mode: str = RESIZE_BY
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = upscalers.LANCZOS
    upscaler_2: str = upscalers.NONE
    extras_upscaler_2_visibility: float = 0.0

    def __post_init__(self) -> None:
        mode = {0: RESIZE_BY, 1: RESIZE_TO}.get(self.resize_mode, self.resize_mode)
        object.__setattr__(self, "resize_mode", mode)
        if mode not in (RESIZE_BY, RESIZE_TO):
            raise ValueError(f"resize mode must be '{RESIZE_BY}' (a factor) or '{RESIZE_TO}' (a size), got {mode!r}")
        if not 0.1 <= self.upscaling_resize <= 8:
            raise ValueError(f"upscale factor must be between 0.1 and 8, got {self.upscaling_resize}")
        for value in (self.upscaling_resize_w, self.upscaling_resize_h):
            if not 1 <= value <= MAX_SIDE:
                raise ValueError(f"target width and height must be between 1 and {MAX_SIDE}, got {value}")
        if not 0.0 <= self.extras_upscaler_2_visibility <= 1.0:
            raise ValueError(f"upscaler 2 visibility must be between 0 and 1, got {self.extras_upscaler_2_visibility}")
        if upscalers.is_latent(self.upscaler_1) or upscalers.is_latent(self.upscaler_2):
            raise ValueError("latent upscalers work only in hires fix; choose Lanczos, Nearest or a model")


def output_size(options: ExtrasOptions, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(size to upscale to, final crop size or None)."""
    if options.resize_mode == RESIZE_BY:
        size = (round(width * options.upscaling_resize), round(height * options.upscaling_resize))
        crop = None
    else:
        target = (options.upscaling_resize_w, options.upscaling_resize_h)
        scale = max(target[0] / width, target[1] / height)
        size = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
        crop = target if options.upscaling_crop else None
    if max(size) > MAX_SIDE:
        raise ValueError(f"the result would be {size[0]}x{size[1]}, larger than {MAX_SIDE}; lower the factor")
    return size, crop


def upscale(tool: upscalers.Upscalers, image: Image.Image, options: ExtrasOptions) -> tuple[Image.Image, dict[str, Any]]:
    """The upscaled image and A1111's postprocessing fields for it."""
    source = image.convert("RGB")
    (width, height), crop = output_size(options, source.width, source.height)
    result = tool.upscale(source, width, height, options.upscaler_1)
    info: dict[str, Any] = {}
    if options.resize_mode == RESIZE_BY:
        info["Postprocess upscale by"] = _number(options.upscaling_resize)
    else:
        info["Postprocess upscale to"] = f"{options.upscaling_resize_w}x{options.upscaling_resize_h}"
        info["Postprocess crop to fit"] = bool(options.upscaling_crop)
    info["Postprocess upscaler"] = options.upscaler_1
    if options.upscaler_2 not in (upscalers.NONE, "", None) and options.extras_upscaler_2_visibility > 0:
        second = tool.upscale(source, width, height, options.upscaler_2)
        result = Image.blend(result, second, options.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = options.upscaler_2
        info["Postprocess upscaler 2 visibility"] = _number(options.extras_upscaler_2_visibility)
    if crop is not None and result.size != crop:
        left, top = (result.width - crop[0]) // 2, (result.height - crop[1]) // 2
        result = result.crop((left, top, left + crop[0], top + crop[1]))
    return result, info


def postprocessing_text(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def png_bytes(image: Image.Image, parameters: str | None, postprocessing: str) -> bytes:
    """PNG with the source's `parameters` kept and A1111's `postprocessing` chunk added."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    info.add_text("postprocessing", postprocessing)
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info)
    return out.getvalue()


def save(outputs: OutputStore, image: Image.Image, parameters: str | None, postprocessing: str) -> Path:
    folder = outputs.folder(CATEGORY)
    data = png_bytes(image, parameters, postprocessing)
    # A1111 names extras `NNNNN.png` (no seed), which next_sequence_number (`NNNNN-`) skips.
    number = max(next_sequence_number(folder), _next_bare_number(folder))
    for _ in range(100):
        path = folder / f"{number:05d}.png"
        try:
            return atomic_write_bytes(path, data, overwrite=False)
        except FileExistsError:
            number += 1  # another writer took it
    raise OSError(f"could not find a free file name in {folder}")


def _next_bare_number(folder: Path) -> int:
    numbers = [int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def process_one(tool: upscalers.Upscalers, outputs: OutputStore | None, image: Image.Image,
                options: ExtrasOptions) -> tuple[Image.Image, str, Path | None]:
    """Upscale one image; save it when `outputs` is given. Returns (image, postprocessing, path)."""
    parameters = read_infotext(image)
    result, info = upscale(tool, image, options)
    text = postprocessing_text(info)
    path = save(outputs, result, parameters, text) if outputs is not None else None
    return result, text, path


def batch_folder_images(folder: str | Path, allowed_root: Path) -> list[Path]:
    """Image files directly in `folder`, which must lie inside `allowed_root` (the data dir):
    a batch cannot read arbitrary server folders."""
    if not folder:
        raise ValueError("enter an input folder (inside the data folder)")
    root = Path(allowed_root).resolve()
    path = Path(folder)
    path = (path if path.is_absolute() else root / path).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"the input folder must be inside the data folder {root}")
    if not path.is_dir():
        raise ValueError(f"input folder {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no PNG, JPEG or WebP images in {path}")
    if len(files) > MAX_BATCH:
        raise ValueError(f"{len(files)} images in {path}; at most {MAX_BATCH} per batch")
    return files


def open_images(paths: Iterable[str | Path], *, max_pixels: int = uploads.DEFAULT_MAX_PIXELS,
                max_bytes: int = uploads.DEFAULT_MAX_BYTES) -> Iterable[Image.Image]:
    """Each file decoded through pipelines.uploads (size and pixel limits from the header, so a
    decompression bomb is refused before decoding), its .info (the parameters text) kept."""
    for path in paths:
        name = Path(path).name
        try:
            data = Path(path).read_bytes() if Path(path).stat().st_size <= max_bytes else None
        except OSError as exc:
            raise ValueError(f"{name} cannot be read: {exc.strerror}") from None
        if data is None:
            raise ValueError(f"{name} is above the {max_bytes >> 20} MB limit; send a smaller file")
        try:
            yield uploads.decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def _number(value: float):
    return int(value) if float(value).is_integer() else value
