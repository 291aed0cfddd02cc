"""Scripts as the A1111 API names them: `GET /scripts`, `GET /script-info` and the
`alwayson_scripts` of a request. Easel has no script system of its own; what it lists here are
the features real clients look for by script name (ControlNet, once the engine has it).

Integration point (control lane): when `GenerationRequest` has `control_units` and
`pipelines.control` offers `ControlUnit.from_a1111(dict)`, ControlNet units in
`alwayson_scripts["ControlNet"]["args"]` become request units, and "controlnet" and
"controlnet m2m" are listed (webuiapi checks for the latter).
"""
from __future__ import annotations

from typing import Any, Collection, Mapping

from api.images import ImageLimits, decode_image

CONTROLNET = "controlnet"


def controlnet_available(request_fields: Collection[str]) -> bool:
    if "control_units" not in request_fields:
        return False
    try:
        from pipelines.control import ControlUnit  # noqa: F401 (the control lane's module)
    except ImportError:
        return False
    return hasattr(ControlUnit, "from_a1111")


def script_names(request_fields: Collection[str]) -> dict[str, list[str]]:
    names = [CONTROLNET, "controlnet m2m"] if controlnet_available(request_fields) else []
    return {"txt2img": list(names), "img2img": list(names)}


def script_info(request_fields: Collection[str]) -> list[dict[str, Any]]:
    if not controlnet_available(request_fields):
        return []
    return [{"name": CONTROLNET, "is_alwayson": True, "is_img2img": is_img2img, "args": []}
            for is_img2img in (False, True)]


def request_values(alwayson_scripts: Mapping[str, Any] | None, request_fields: Collection[str],
                   limits: ImageLimits = ImageLimits()) -> dict[str, Any]:
    """GenerationRequest fields from `alwayson_scripts` (titles match case-insensitively).
    An empty ControlNet entry (webuiapi always sends one) is fine; a script Easel does not
    have is a ValueError, as in A1111."""
    values: dict[str, Any] = {}
    for title, entry in (alwayson_scripts or {}).items():
        args = entry.get("args", []) if isinstance(entry, Mapping) else []
        if not isinstance(args, list):
            raise ValueError(f"alwayson_scripts['{title}']['args'] must be a list")
        if str(title).lower() == CONTROLNET:
            units = [a for a in args if isinstance(a, Mapping) and a.get("enabled", True)]
            if not units:
                continue
            if not controlnet_available(request_fields):
                raise ValueError("ControlNet units were sent, but this Easel build has no ControlNet support yet")
            from pipelines.control import ControlUnit
            values["control_units"] = tuple(ControlUnit.from_a1111(with_decoded_image(unit, index, limits))
                                            for index, unit in enumerate(units))
        else:
            raise ValueError(f"script '{title}' is not available in Easel; GET /sdapi/v1/scripts lists those that are")
    return values


def with_decoded_image(unit: Mapping[str, Any], index: int, limits: ImageLimits) -> dict[str, Any]:
    """The unit with its image decoded here (base64 only, size limits), whichever shape the
    client used: a string, `{"image", "mask"}`, `[image, mask]` or the legacy `input_image`."""
    unit = dict(unit)
    image = unit.pop("input_image", None) if "image" not in unit else unit.get("image")
    if isinstance(image, list):
        image = image[0] if image else None
    if isinstance(image, Mapping):
        image = image.get("image")
    unit["image"] = decode_image(image, f"ControlNet unit {index} image", limits) if image else None
    return unit
