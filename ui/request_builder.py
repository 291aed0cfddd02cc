"""Form values (a dict keyed by field name) -> GenerationRequest. No Gradio here, so the UI's
mapping is testable on its own and the same names serve the gradio_client API."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image

from pipelines.additions import EngineAdditions
from pipelines.request import GenerationRequest
from ui.control_form import units_from_form

COMMON_FIELDS = ("prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg_scale",
                 "width", "height", "seed", "batch_count", "batch_size", "styles", "clip_skip", "emphasis", "wildcard_mode",
                 "tiling")
MODEL_FIELDS = ("checkpoint", "vae")
# hires fix + SDXL refiner (A1111 API names); denoising_strength is the hires pass's here
HIRES_FIELDS = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                "hr_checkpoint", "hr_sampler", "hr_prompt", "hr_negative_prompt", "denoising_strength",
                "refiner_checkpoint", "refiner_switch_at")
VARIATION_FIELDS = ("subseed", "subseed_strength")  # txt2img only (GenerationRequest refuses them elsewhere)
TXT2IMG_FIELDS = COMMON_FIELDS + VARIATION_FIELDS + HIRES_FIELDS
IMG2IMG_FIELDS = COMMON_FIELDS + (
    "mode", "init_image", "inpaint_image", "mask", "denoising_strength", "resize_mode", "mask_blur",
    "inpainting_fill", "inpaint_area", "inpaint_full_res_padding", "inpainting_mask_invert")

IMG2IMG_MODES = ("img2img", "inpaint")
INPAINT_AREAS = ("Whole picture", "Only masked")


def txt2img_request(values: Mapping[str, Any], additions: EngineAdditions | None = None) -> GenerationRequest:
    """`additions`: the app's extension samplers/preprocessors (`ctx.additions`)."""
    return GenerationRequest(task="txt2img", **_common(values), **_variation(values), **hires_values(values),
                             additions=additions)


def _variation(values: Mapping[str, Any]) -> dict[str, Any]:
    return {"subseed": _number(values, "subseed", int, -1),
            "subseed_strength": _number(values, "subseed_strength", float, 0.0)}


def hires_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The hires / refiner fields present in `values`; absent ones keep the request defaults."""
    kinds = {"hr_scale": float, "hr_second_pass_steps": int, "hr_resize_x": int, "hr_resize_y": int,
             "denoising_strength": float, "refiner_switch_at": float}
    out: dict[str, Any] = {}
    for name in HIRES_FIELDS:
        if name not in values or values[name] is None:
            continue
        if name in kinds:
            out[name] = _number(values, name, kinds[name], 0)
        elif name == "enable_hr":
            out[name] = bool(values[name])
        elif name in ("hr_checkpoint", "hr_sampler", "refiner_checkpoint"):
            out[name] = values[name] or None
        else:
            out[name] = values[name]
    return out


def img2img_request(values: Mapping[str, Any], additions: EngineAdditions | None = None) -> GenerationRequest:
    mode = values.get("mode") or "img2img"
    if mode not in IMG2IMG_MODES:
        raise ValueError(f"mode must be one of {', '.join(IMG2IMG_MODES)}, got '{mode}'")
    area = values.get("inpaint_area") or INPAINT_AREAS[0]
    if area not in INPAINT_AREAS:
        raise ValueError(f"inpaint area must be one of {', '.join(INPAINT_AREAS)}, got '{area}'")
    init_image = values.get("init_image")
    mask = None
    if mode == "inpaint":
        drawn_on, drawn_mask = split_editor_value(values.get("inpaint_image"))
        init_image = drawn_on or init_image
        uploaded = values.get("mask")
        mask = uploaded.convert("L") if uploaded is not None else drawn_mask
    return GenerationRequest(
        task=mode, init_image=init_image, mask=mask,
        denoising_strength=_number(values, "denoising_strength", float, 0.75),
        resize_mode=values.get("resize_mode") or "just resize",
        mask_blur=_number(values, "mask_blur", int, 4),
        inpainting_fill=values.get("inpainting_fill") or "original",
        inpaint_full_res=area == "Only masked",
        inpaint_full_res_padding=_number(values, "inpaint_full_res_padding", int, 32),
        inpainting_mask_invert=bool(values.get("inpainting_mask_invert")),
        additions=additions, **_common(values))


def split_editor_value(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """A gr.ImageEditor value -> (background image, mask). The mask is white wherever any
    layer was painted (alpha > 0), whatever the brush colour; None when nothing is painted."""
    if not value:
        return None, None
    background = value.get("background")
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    if background is None:
        return None, None
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in layers:
        alpha = np.asarray(layer.convert("RGBA").resize(background.size))[..., 3]
        painted |= alpha > 0
    mask = Image.fromarray((painted * 255).astype(np.uint8), "L") if painted.any() else None
    return background.convert("RGB"), mask


def _common(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "prompt": values.get("prompt") or "",
        "negative_prompt": values.get("negative_prompt") or "",
        "checkpoint": values.get("checkpoint") or None,
        "vae": values.get("vae") or "Automatic",
        "sampler": values.get("sampler") or "Euler a",
        "schedule": values.get("schedule") or "Automatic",
        "steps": _number(values, "steps", int, 20),
        "cfg_scale": _number(values, "cfg_scale", float, 7.0),
        "width": _number(values, "width", int, 512),
        "height": _number(values, "height", int, 512),
        "seed": _number(values, "seed", int, -1),
        "batch_count": _number(values, "batch_count", int, 1),
        "batch_size": _number(values, "batch_size", int, 1),
        "styles": tuple(values.get("styles") or ()),
        "clip_skip": _number(values, "clip_skip", int, 1),
        "emphasis": values.get("emphasis") or "Original",
        "wildcard_mode": values.get("wildcard_mode") or "random",
        "tiling": bool(values.get("tiling")),
        "control_units": units_from_form(values),
        "gligen_model": values.get("gligen_model") or "",
        "gligen_boxes": values.get("gligen_boxes") or (),
    }


def _number(values: Mapping[str, Any], name: str, kind: type, default: float | int):
    value = values.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from None
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}")
        return int(number)
    return number
