"""Plan the cells of an X/Y/Z plot, run them, and draw labelled grids (one per Z value).

Every cell is an ordinary GenerationRequest with batch 1 and one fixed seed (unless Seed is an
axis), so a cell is exactly the image a single generation with those settings gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from pipelines.generate import resolve_seed
from pipelines.metadata import quote
from pipelines.request import GenerationRequest, GenerationResult

from .axes import NOTHING, Axis, axis_types

MAX_CELLS = 500
LABEL_PAD = 8
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    z: int
    request: GenerationRequest


@dataclass(frozen=True)
class Grid:
    image: Image.Image
    boxes: dict  # (x, y) -> (left, top, right, bottom) of that cell's image inside the grid
    infotext: str
    z_label: str
    seed: int  # the first cell's seed (names the saved file)


@dataclass(frozen=True)
class PlotResult:
    grids: list[Grid]
    cells: list[Cell]
    results: list[GenerationResult]


def nothing_axis() -> Axis:
    return Axis(axis_types()[NOTHING], (None,))


def plan_cells(base: GenerationRequest, axes: Sequence[Axis]) -> list[Cell]:
    """All cells, Z-major then Y then X; every request is built (and validated) before any runs."""
    axes = list(axes) + [nothing_axis()] * (3 - len(axes))
    if len(axes) > 3:
        raise ValueError("an X/Y/Z plot has at most three axes")
    x_axis, y_axis, z_axis = axes
    total = len(x_axis.values) * len(y_axis.values) * len(z_axis.values)
    if total > MAX_CELLS:
        raise ValueError(f"{total} cells is too many (at most {MAX_CELLS}): use fewer values")
    base = base.with_changes(batch_count=1, batch_size=1)
    if not any(a.type.label == "Seed" for a in axes):
        base = base.with_changes(seed=resolve_seed(base.seed))  # the same seed in every cell
    cells = []
    for z, z_value in enumerate(z_axis.values):
        for y, y_value in enumerate(y_axis.values):
            for x, x_value in enumerate(x_axis.values):
                request = x_axis.type.apply(base, x_value)
                request = y_axis.type.apply(request, y_value)
                request = z_axis.type.apply(request, z_value)
                cells.append(Cell(x, y, z, request))
    return cells


def run_plot(base: GenerationRequest, axes: Sequence[Axis],
             run: Callable[[GenerationRequest], GenerationResult],
             cancelled: Callable[[], bool] = lambda: False) -> PlotResult:
    axes = list(axes) + [nothing_axis()] * (3 - len(axes))
    cells = plan_cells(base, axes)
    results = []
    for cell in cells:
        if cancelled():
            break
        result = run(cell.request)
        if not result.images:  # interrupted
            break
        results.append(result)
    grids = []
    x_axis, y_axis, z_axis = axes
    per_grid = len(x_axis.values) * len(y_axis.values)
    for z, z_label in enumerate(z_axis.labels()):
        chunk = results[z * per_grid:(z + 1) * per_grid]
        if len(chunk) < per_grid:
            break
        image, boxes = draw_grid([r.images[0] for r in chunk], x_axis.labels(), y_axis.labels(), z_label)
        grids.append(Grid(image, boxes, grid_infotext(chunk[0].infotexts[0], axes), z_label, chunk[0].seeds[0]))
    return PlotResult(grids, cells, results)


def grid_infotext(first_cell_infotext: str, axes: Sequence[Axis]) -> str:
    """The first cell's infotext plus A1111's "Script", "X Type", "X Values", ... fields."""
    extra = {"Script": "X/Y/Z plot"}
    for name, axis in zip("XYZ", axes):
        if not axis.is_nothing:
            values = [v[1] if isinstance(v, tuple) else v for v in axis.values]
            extra[f"{name} Type"] = axis.type.label
            extra[f"{name} Values"] = ", ".join(str(v) for v in values)
    return first_cell_infotext + ", " + ", ".join(f"{k}: {quote(v)}" for k, v in extra.items())


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines (the last one cut with "…")."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_fit(draw, line, font, width) for line in lines]


def draw_grid(images: Sequence[Image.Image], x_labels: Sequence[str], y_labels: Sequence[str],
              title: str = "") -> tuple[Image.Image, dict]:
    """Images pasted unscaled (so each cell equals its image pixel for pixel), column labels on
    top, row labels on the left, an optional title line above. Cells are as large as the largest
    image (Width/Height axes); a smaller image sits centred in its cell."""
    cols, rows = len(x_labels), len(y_labels)
    if len(images) != cols * rows:
        raise ValueError(f"{len(images)} images do not fill a {cols}x{rows} grid")
    width, height = max(im.width for im in images), max(im.height for im in images)
    font = _font(max(10, min(28, width // 20)))  # labels scale with the images, as in A1111
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + LABEL_PAD
    show_x, show_y = any(x_labels), any(y_labels)
    left = (min(max(int(measure.textlength(t, font=font)) for t in y_labels), 240) + 2 * LABEL_PAD) if show_y else 0
    x_lines = [_wrap(measure, label, font, width - 4) for label in x_labels] if show_x else []
    header = max((len(lines) for lines in x_lines), default=0) * line_h
    top = (line_h if title else 0) + header
    grid = Image.new("RGB", (left + cols * width, top + rows * height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((LABEL_PAD, LABEL_PAD // 2), _fit(draw, title, font, grid.width - 2 * LABEL_PAD), fill=INK, font=font)
    boxes = {}
    for y in range(rows):
        for x in range(cols):
            image = images[y * cols + x]
            x0 = left + x * width + (width - image.width) // 2
            y0 = top + y * height + (height - image.height) // 2
            grid.paste(image.convert("RGB"), (x0, y0))
            boxes[(x, y)] = (x0, y0, x0 + image.width, y0 + image.height)
    for x, lines in enumerate(x_lines):
        center = left + x * width + width / 2
        for i, text in enumerate(lines):  # bottom-aligned just above the column
            y_pos = top - (len(lines) - i) * line_h + LABEL_PAD // 2
            draw.text((center - draw.textlength(text, font=font) / 2, y_pos), text, fill=INK, font=font)
    if show_y:
        for y, label in enumerate(y_labels):
            text = _fit(draw, label, font, left - 2 * LABEL_PAD)
            draw.text((LABEL_PAD, top + y * height + height / 2 - line_h / 2), text, fill=INK, font=font)
    return grid, boxes
