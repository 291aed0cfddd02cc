"""img2img / inpaint image operations with AUTOMATIC1111's semantics (pure PIL + numpy).

A1111 references: modules/images.py `resize_image`, modules/masking.py (`get_crop_region_v2`,
`expand_crop_region`), modules/processing.py (mask binarisation, blur, overlays).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive, as PIL's crop takes it


def resize_mode_name(mode: str | int) -> str:
    """'just resize' | 'crop and resize' | 'resize and fill' from a name, an A1111 label or 0/1/2."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    if isinstance(mode, str) and mode.strip().casefold() in RESIZE_MODES:
        return mode.strip().casefold()
    raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)} (or 0, 1, 2), got {mode!r}")


# --- resizing --------------------------------------------------------------------------------

def resize_image(image: Image.Image, width: int, height: int, mode: str | int) -> Image.Image:
    """Exactly width x height. RGB, RGBA and L keep their mode (RGBA/L for masks); others -> RGB.

    just resize: stretch. crop and resize: scale to cover, centre-crop. resize and fill: scale to
    fit, centre, and fill the empty bands by stretching the image's edge rows/columns (A1111).
    """
    mode = resize_mode_name(mode)
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    image = _working_mode(image)
    if mode == "just resize":
        return _resize(image, width, height)

    target_ratio, source_ratio = width / height, image.width / image.height
    if mode == "crop and resize":
        # Cover: the side that is short relative to the target matches it exactly.
        fit_w = width if target_ratio > source_ratio else image.width * height // image.height
        fit_h = height if target_ratio <= source_ratio else image.height * width // image.width
        resized = _resize(image, fit_w, fit_h)
        left, top = fit_w // 2 - width // 2, fit_h // 2 - height // 2
        return resized.crop((left, top, left + width, top + height))

    # Fit inside, then fill the bands.
    fit_w = width if target_ratio < source_ratio else max(1, image.width * height // image.height)
    fit_h = height if target_ratio >= source_ratio else max(1, image.height * width // image.width)
    pixels = np.asarray(_resize(image, fit_w, fit_h))
    left, top = width // 2 - fit_w // 2, height // 2 - fit_h // 2
    right, bottom = left + fit_w, top + fit_h
    out = np.empty((height, width) + pixels.shape[2:], dtype=pixels.dtype)
    out[top:bottom, left:right] = pixels
    out[:top, left:right] = pixels[:1]
    out[bottom:, left:right] = pixels[-1:]
    out[:, :left] = out[:, left:left + 1]
    out[:, right:] = out[:, right - 1:right]
    return Image.fromarray(out)


def _working_mode(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "RGBA", "L"):
        return image
    if image.mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


# --- masks -----------------------------------------------------------------------------------

def prepare_mask(mask: Image.Image, *, blur: int, invert: bool) -> Image.Image:
    """An "L" mask, white = repaint: binarised at 128, inverted if asked, then Gaussian-blurred
    with standard deviation `blur` pixels (A1111's cv2 kernel, 2*int(2.5*blur + 0.5) + 1 wide).

    Masks with transparency (a Gradio sketch layer: strokes on a transparent canvas) use their
    alpha channel, as A1111's `create_binary_mask` does; opaque ones their luminance.
    """
    if blur < 0:
        raise ValueError(f"mask blur must be 0 or more, got {blur}")
    binary = _mask_channel(mask).point(lambda v: 255 if v > 128 else 0)
    if invert:
        binary = ImageOps.invert(binary)
    if blur > 0:
        binary = gaussian_blur(binary, blur)
    return binary


def _mask_channel(mask: Image.Image) -> Image.Image:
    if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
        return mask.convert("RGBA").convert("L")
    return mask.convert("L")


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    """Separable Gaussian of an "L" image with OpenCV's kernel size for `sigma` and its default
    border (reflect-101), so A1111's mask blur is reproduced without OpenCV."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float64) / sigma) ** 2)
    taps /= taps.sum()
    blurred = _blur_matrix(pixels.shape[0], taps) @ pixels @ _blur_matrix(pixels.shape[1], taps).T
    return Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8))


def _blur_matrix(size: int, taps: np.ndarray) -> np.ndarray:
    """M with (M @ x)[i] = sum_k taps[k] * x[reflect101(i + k - r)]: a 1-D blur with the border
    folded into the matrix, so one matrix product blurs every row (or column) at once."""
    radius = len(taps) // 2
    matrix = np.zeros((size, size), dtype=np.float32)
    if size == 1:
        matrix[0, 0] = 1.0
        return matrix
    period = 2 * size - 2
    offsets = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]
    source = np.mod(offsets, period)
    source = np.where(source < size, source, period - source)
    rows = np.broadcast_to(np.arange(size)[:, None], source.shape)
    np.add.at(matrix, (rows, source), np.broadcast_to(taps, source.shape).astype(np.float32))
    return matrix


# --- "only masked" inpainting ----------------------------------------------------------------

def masked_crop_region(mask: Image.Image, padding: int, image_width: int, image_height: int,
                       target_width: int, target_height: int) -> Box:
    """The region "only masked" inpaints: the mask's bounding box grown by `padding`, then grown
    to the target aspect ratio (A1111 `get_crop_region_v2` + `expand_crop_region`), inside the
    image. When the image is too small for that ratio the box is the full side and the ratio is
    not met (as in A1111)."""
    if mask.size != (image_width, image_height):
        raise ValueError(f"mask is {mask.width}x{mask.height} but the image is {image_width}x{image_height}: "
                         "resize the mask to the image first")
    if padding < 0:
        raise ValueError(f"masked area padding must be 0 or more, got {padding}")
    bbox = mask.convert("L").getbbox()
    if bbox is None:
        raise ValueError("the mask is empty: paint the area to change")
    x1, y1, x2, y2 = bbox
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, image_width), min(y2 + padding, image_height)
    target_ratio = target_width / target_height
    if (x2 - x1) / (y2 - y1) > target_ratio:
        y1, y2 = _grow_span(y1, y2, round((x2 - x1) / target_ratio), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, round((y2 - y1) * target_ratio), image_width)
    return int(x1), int(y1), int(x2), int(y2)


def _grow_span(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """Grow [start, end) around its centre to `size` (at most `limit`), shifted back inside [0, limit)."""
    size = min(max(size, end - start), limit)
    start -= (size - (end - start)) // 2
    start = min(max(start, 0), limit - size)
    return start, start + size


def paste_back(original: Image.Image, generated_crop: Image.Image, box: Box, mask: Image.Image) -> Image.Image:
    """Resize the generated crop to `box`, place it in the original and composite through the
    full-size (blurred) mask: pixels where the mask is 0 stay the original's, byte for byte."""
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= original.width and 0 <= y1 < y2 <= original.height):
        raise ValueError(f"crop box {box} is not inside the {original.width}x{original.height} image")
    if mask.size != original.size:
        raise ValueError(f"mask is {mask.width}x{mask.height} but the image is {original.width}x{original.height}")
    base = original.convert("RGB")
    placed = base.copy()
    placed.paste(_resize(generated_crop.convert("RGB"), x2 - x1, y2 - y1), (x1, y1))
    return Image.composite(placed, base, mask.convert("L"))


# --- "whole picture" inpainting --------------------------------------------------------------

def composite_masked(original: Image.Image, generated: Image.Image, mask: Image.Image, *,
                     gain: float = 2.0) -> Image.Image:
    """Generated over original through the mask, so unmasked pixels are exactly the original's.

    `gain` scales the mask first (clipped to 255): A1111 doubles the blurred mask for the
    whole-picture overlay, so the inner half of the blur is fully generated and only the outer
    half blends. Pass gain=1 for a plain composite.
    """
    if not (original.size == generated.size == mask.size):
        raise ValueError(f"sizes differ: original {original.size}, generated {generated.size}, mask {mask.size}; "
                         "resize them to the same size first")
    weights = np.asarray(mask.convert("L"), dtype=np.float32) * gain
    overlay = Image.fromarray(np.clip(np.rint(weights), 0, 255).astype(np.uint8))
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), overlay)
