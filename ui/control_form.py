"""ControlNet unit form values <-> ControlUnit. No Gradio here, so the mapping is testable on its
own and the same flat names (`cn0_weight`, `cn1_model`, ...) serve the gradio_client API."""
from __future__ import annotations

from typing import Any, Mapping

from pipelines.control import ControlUnit
from pipelines.control.units import NO_MODEL

UNIT_FIELDS = ("enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end",
               "control_mode", "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")
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
            enabled=True, image=get("image", None), module=get("module", "none"), model=get("model", NO_MODEL),
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
                values[field_name(index, field)] = getattr(unit, field)
        values[field_name(index, "enabled")] = True
    return values
