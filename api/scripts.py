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


def script_info(request_fields: Collection[str], unit_count: int = 3) -> list[dict[str, Any]]:
    """A1111's `ScriptInfo` list: name, is_alwayson, is_img2img and one `ScriptArg` (label,
    value, minimum, maximum, step, choices) per argument slot, here one per ControlNet unit."""
    if not controlnet_available(request_fields):
        return []
    args = [{"label": f"ControlNet Unit {i}", "value": None, "minimum": None, "maximum": None, "step": None,
             "choices": None} for i in range(unit_count)]
    return [{"name": CONTROLNET, "is_alwayson": True, "is_img2img": is_img2img, "args": [dict(a) for a in args]}
            for is_img2img in (False, True)]


def check_script_name(script_name: str | None) -> None:
    """A1111 runs `script_name` (X/Y/Z plot, ...) from the request; Easel's REST API runs none,
    so naming one is a ValueError instead of a request that silently runs without it."""
    if script_name:
        raise ValueError(f"script_name '{script_name}' is not available through the REST API; "
                         "leave it out (GET /sdapi/v1/scripts lists the always-on scripts)")


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
            # Numbered by position in args, as the extension numbers its units.
            units = [(i, a) for i, a in enumerate(args) if isinstance(a, Mapping) and a.get("enabled", True)]
            if not units:
                continue
            if not controlnet_available(request_fields):
                raise ValueError("ControlNet units were sent, but this Easel build has no ControlNet support yet")
            from pipelines.control import ControlUnit
            values["control_units"] = tuple(ControlUnit.from_a1111(with_decoded_image(unit, index, limits),
                                                                   f"ControlNet unit {index}")
                                            for index, unit in units)
        else:
            raise ValueError(f"script '{title}' is not available in Easel; GET /sdapi/v1/scripts lists those that are")
    return values


def with_decoded_image(unit: Mapping[str, Any], index: int, limits: ImageLimits) -> dict[str, Any]:
    """The unit with its image and mask decoded here (base64 only, size limits), whichever shape
    the client used: a string, `{"image", "mask"}`, `[image, mask]`, `mask` / `mask_image`
    beside it, or the legacy `input_image`. What the mask then does is the control lane's rule
    (`pipelines.control.units.unit_mask_as_image`)."""
    from pipelines.control.units import a1111_image_fields

    where = f"ControlNet unit {index}"
    rest, image, mask = a1111_image_fields(unit, where)
    rest["image"] = decode_image(image, f"{where} image", limits) if image is not None else None
    rest["mask"] = decode_image(mask, f"{where} mask", limits) if mask is not None else None
    return rest
