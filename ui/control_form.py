"""ControlNet unit form values <-> ControlUnit. No Gradio here, so the mapping is testable on its
own and the same flat names (`cn0_weight`, `cn1_model`, ...) serve the gradio_client API."""
from __future__ import annotations

from typing import Any, Mapping

from pipelines.control import ControlUnit
from pipelines.control.units import NO_MODEL

UNIT_FIELDS = ("enabled", "type", "image", "module", "model", "weight", "guidance_start", "guidance_end",
               "control_mode", "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")
_ATTRIBUTES = {"type": "unit_type"}  # form field -> ControlUnit attribute, where they differ
IMAGE_NOT_RESTORED = "ControlNet settings restored; the control images are not stored in infotext: upload them again."


def field_name(index: int, field: str) -> str:
    return f"cn{index}_{field}"


def control_fields(count: int) -> tuple[str, ...]:
    return tuple(field_name(i, f) for i in range(count) for f in UNIT_FIELDS)


def units_from_form(values: Mapping[str, Any]) -> tuple[ControlUnit, ...]:
    """The enabled units, in order. Units left off (no `cnN_enabled` value) end the list."""
    units = []
    index = 0
    while field_name(index, "enabled") in values:
        if values.get(field_name(index, "enabled")):
            units.append(_unit(values, index))
        index += 1
    return tuple(units)


def _unit(values: Mapping[str, Any], index: int) -> ControlUnit:
    def get(field: str, default: Any) -> Any:
        value = values.get(field_name(index, field))
        return default if value is None or value == "" else value

    try:
        return ControlUnit(
            enabled=True, unit_type=get("type", "All"), image=get("image", None), module=get("module", "none"),
            model=get("model", NO_MODEL),
            weight=float(get("weight", 1.0)), guidance_start=float(get("guidance_start", 0.0)),
            guidance_end=float(get("guidance_end", 1.0)), control_mode=get("control_mode", "Balanced"),
            resize_mode=get("resize_mode", "Crop and Resize"), pixel_perfect=bool(get("pixel_perfect", False)),
            processor_res=int(float(get("processor_res", 512))), threshold_a=float(get("threshold_a", -1)),
            threshold_b=float(get("threshold_b", -1)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ControlNet unit {index}: {exc}") from exc


def form_from_units(units: list[ControlUnit], count: int) -> dict[str, Any]:
    """Form values that show `units` in the first unit slots and disable the rest (the images
    are left as they are: infotext cannot carry them)."""
    values: dict[str, Any] = {}
    for index in range(count):
        if index >= len(units):
            values[field_name(index, "enabled")] = False
            continue
        unit = units[index]
        for field in UNIT_FIELDS:
            if field != "image":
                values[field_name(index, field)] = getattr(unit, _ATTRIBUTES.get(field, field))
        values[field_name(index, "enabled")] = True
    return values


def stroke_mask(editor_value: Any):
    """Where the user drew on a GLIGEN canvas (an ImageEditor value: `layers` of RGBA images over
    a background): H x W bools, the union of the layers' painted (non-transparent) pixels."""
    import numpy as np

    layers = (editor_value.get("layers") or []) if isinstance(editor_value, Mapping) else []
    masks = []
    for layer in layers:
        if layer is None:
            continue
        pixels = np.asarray(layer.convert("RGBA") if hasattr(layer, "convert") else layer)
        if pixels.ndim == 3 and pixels.shape[2] == 4:
            masks.append(pixels[..., 3] > 0)
        elif pixels.ndim >= 2:
            masks.append((pixels.reshape(pixels.shape[:2] + (-1,)) > 0).any(axis=2))
    if not masks:
        raise ValueError("draw at least one box on the GLIGEN canvas first")
    return np.logical_or.reduce(masks)


def boxes_text(boxes) -> str:
    """GLIGEN boxes as the Boxes textbox shows them: `phrase: x0, y0, x1, y1`, one per line."""
    return "\n".join(f"{phrase}: {x0:g}, {y0:g}, {x1:g}, {y1:g}" for phrase, x0, y0, x1, y1 in boxes)
