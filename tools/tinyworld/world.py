"""The tiny-world: one flat shape on a flat background, its captions, and a ground-truth classifier.

Everything here is pure numpy/PIL and deterministic per seed, so tests, the trainer and the
evaluator all agree on what an image of "a red circle on a blue background" is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated, mutually distant colours: the closest pair is more than 200 RGB units apart, so a
# nearest-palette lookup survives the blur and noise of a small generative model.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 225),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 64
# Every word a caption can contain, in a fixed order (the trainer gives each its own direction).
VOCABULARY: tuple[str, ...] = ("a", "on", "background") + COLOURS + SHAPES

_CAPTION_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*$")


@dataclass(frozen=True)
class Classification:
    """What the ground-truth classifier sees; `fg`/`shape` are None when no shape is found."""

    bg: str
    fg: str | None
    shape: str | None


@dataclass(frozen=True)
class Sample:
    fg: str
    shape: str
    bg: str
    image: Image.Image

    @property
    def caption(self) -> str:
        return caption(self.fg, self.shape, self.bg)


def _check(fg: str, shape: str, bg: str) -> None:
    if fg not in PALETTE:
        raise ValueError(f"unknown foreground colour {fg!r}; use one of {', '.join(COLOURS)}")
    if bg not in PALETTE:
        raise ValueError(f"unknown background colour {bg!r}; use one of {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    if fg == bg:
        raise ValueError(f"foreground and background are both {fg!r}; pick two different colours")


def caption(fg: str, shape: str, bg: str) -> str:
    _check(fg, shape, bg)
    return f"a {fg} {shape} on a {bg} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of `caption`: returns (fg, shape, bg)."""
    match = _CAPTION_RE.match(text.lower())
    if not match:
        raise ValueError(f"not a tiny-world caption: {text!r}; expected 'a <colour> <shape> on a <colour> background'")
    fg, shape, bg = match.groups()
    _check(fg, shape, bg)
    return fg, shape, bg


def all_combinations() -> list[tuple[str, str, str]]:
    """Every valid (fg, shape, bg), fg != bg, in a fixed order."""
    return [(fg, shape, bg) for fg in COLOURS for shape in SHAPES for bg in COLOURS if fg != bg]


def _rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(int(rng_or_seed))


def render(fg: str, shape: str, bg: str, rng: np.random.Generator | int, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one shape at a random position and size; the border rows/columns stay background."""
    _check(fg, shape, bg)
    if size < 16:
        raise ValueError(f"size {size} is too small; use at least 16 pixels")
    rng = _rng(rng)
    margin = max(2, size // 32)
    half = rng.uniform(0.16, 0.34) * size  # half the extent: shapes span 1/3 to 2/3 of the image
    cx = rng.uniform(margin + half, size - margin - half)
    cy = rng.uniform(margin + half, size - margin - half)
    image = Image.new("RGB", (size, size), PALETTE[bg])
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=PALETTE[fg])
    elif shape == "square":
        draw.rectangle(box, fill=PALETTE[fg])
    else:  # upright triangle: apex at top centre, base along the bottom of the box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=PALETTE[fg])
    return image


def sample_dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> list[Sample]:
    """`n` samples with uniformly drawn (fg, shape, bg); the same seed gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    samples = []
    for _ in range(n):
        fg, shape, bg = combos[int(rng.integers(len(combos)))]
        samples.append(Sample(fg, shape, bg, render(fg, shape, bg, rng, size)))
    return samples


def _palette_array() -> np.ndarray:
    return np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def nearest_colour(rgb: np.ndarray) -> str:
    distances = np.linalg.norm(_palette_array() - np.asarray(rgb, dtype=np.float32), axis=1)
    return COLOURS[int(np.argmin(distances))]


def _shape_from_mask(mask: np.ndarray) -> str | None:
    # Bounding box from rows/columns holding at least two mask pixels, so stray specks are ignored.
    rows = np.flatnonzero(mask.sum(axis=1) >= 2)
    cols = np.flatnonzero(mask.sum(axis=0) >= 2)
    if len(rows) < 3 or len(cols) < 3:
        return None
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    box = mask[top : bottom + 1, left : right + 1]
    fill = box.mean()
    h, w = box.shape
    # Corner patches: a square fills all four, a circle none, an upright triangle the bottom two only.
    k = max(1, min(h, w) // 6)
    corners = {
        "tl": box[:k, :k].mean(),
        "tr": box[:k, -k:].mean(),
        "bl": box[-k:, :k].mean(),
        "br": box[-k:, -k:].mean(),
    }
    top_filled = (corners["tl"] + corners["tr"]) / 2
    bottom_filled = (corners["bl"] + corners["br"]) / 2
    if fill > 0.88 or (fill > 0.8 and top_filled > 0.5):
        return "square"
    if fill < 0.65 or (bottom_filled - top_filled > 0.4 and fill < 0.75):
        return "triangle"
    return "circle"


def classify(image: Image.Image | np.ndarray) -> Classification:
    """Ground truth for one image: background from the border, foreground from what differs."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {pixels.shape}")
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = nearest_colour(bg_rgb)
    far = np.linalg.norm(pixels - bg_rgb, axis=2) > 60.0
    if far.sum() < 12:
        return Classification(bg=bg, fg=None, shape=None)
    fg_rgb = np.median(pixels[far], axis=0)
    palette = _palette_array()
    # Colour by the palette entry nearest the mask's median, excluding the background entry.
    order = np.argsort(np.linalg.norm(palette - fg_rgb, axis=1))
    fg = next(COLOURS[i] for i in order if COLOURS[i] != bg)
    # Refine the mask: a pixel belongs to the shape when it is nearer the shape colour than the
    # background colour (a midpoint cut, robust to blurred edges).
    mask = np.linalg.norm(pixels - fg_rgb, axis=2) < np.linalg.norm(pixels - bg_rgb, axis=2)
    return Classification(bg=bg, fg=fg, shape=_shape_from_mask(mask))
