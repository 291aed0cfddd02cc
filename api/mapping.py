"""The one place A1111 API payloads become a `GenerationRequest`, and results become A1111
responses. Other lanes add their fields' A1111 names here (`_OPTIONAL_FIELDS`): a field is
passed on only when `GenerationRequest` has it, so this module works before and after they land.
"""
from __future__ import annotations

import json
import time
from dataclasses import fields
from typing import Any

from api.images import ImageLimits, decode_image, encode_png
from api.models import Img2ImgRequest, Txt2ImgRequest, _Processing
from api.options import CHECKPOINT, CLIP_SKIP, VAE, ApiOptions
from pipelines.metadata import parse_infotext_typed, split_infotext
from pipelines.additions import EngineAdditions
from pipelines.request import GenerationRequest, GenerationResult

MASKED_CONTENT = {0: "fill", 1: "original"}  # 2 latent noise, 3 latent nothing: not in Easel
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}
# A1111 request field -> GenerationRequest field, for fields other lanes add (same names).
_OPTIONAL_FIELDS = ("styles", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
                    "hr_resize_x", "hr_resize_y", "hr_prompt", "hr_negative_prompt",
                    "refiner_checkpoint", "refiner_switch_at", "tiling", "subseed", "subseed_strength")
_RENAMED_OPTIONAL = {"hr_checkpoint_name": "hr_checkpoint", "hr_sampler_name": "hr_sampler"}
# Keys of the infotext that `info` reports in its own fields, not in extra_generation_params.
_CORE_INFOTEXT_KEYS = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale",
                       "Seed", "Size", "Model hash", "Model", "VAE hash", "VAE",
                       "Denoising strength", "Clip skip", "Version"}


# Infotext key -> A1111 request field, for `infotext` in a request (A1111 1.10 `apply_infotext`).
_INFOTEXT_FIELDS = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps",
                    "Sampler": "sampler_name", "Schedule type": "scheduler", "CFG scale": "cfg_scale",
                    "Seed": "seed", "Size-1": "width", "Size-2": "height", "Denoising strength": "denoising_strength",
                    "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps", "Hires upscaler": "hr_upscaler",
                    "Mask blur": "mask_blur", "Masked area padding": "inpaint_full_res_padding", "Tiling": "tiling",
                    "Variation seed": "subseed", "Variation seed strength": "subseed_strength"}


def with_infotext(payload: _Processing) -> _Processing:
    """Fields from a pasted `infotext`, as A1111 applies it: a field the request sets itself wins;
    Clip skip goes to override_settings; a Hires key turns the hires fix on."""
    if not payload.infotext:
        return payload
    params = parse_infotext_typed(payload.infotext)
    given = payload.model_fields_set
    changes: dict[str, Any] = {}
    for key, name in _INFOTEXT_FIELDS.items():
        if key in params and name in type(payload).model_fields and name not in given:
            changes[name] = params[key]
    if "Hires upscale" in params and "enable_hr" in type(payload).model_fields and "enable_hr" not in given:
        changes["enable_hr"] = True
    overrides = dict(payload.override_settings or {})
    if "Clip skip" in params and CLIP_SKIP not in overrides:
        overrides[CLIP_SKIP] = params["Clip skip"]
        changes["override_settings"] = overrides
    return payload.model_validate(payload.model_dump() | changes)


def _schedule_label(name: str | None) -> str | None:
    """A schedule's label from any of its names (A1111 sends `karras` or "Karras"); None: unknown."""
    from pipelines import samplers
    key = " ".join(str(name or "Automatic").split()).casefold()
    return next((s.label for s in samplers.schedules()
                 if key in (s.name.casefold(), s.label.casefold(), *(a.casefold() for a in s.aliases))), None)


def check_unsupported(payload: _Processing) -> None:
    """A1111 fields Easel accepts but cannot honour: refused when set, so a client never gets an
    image made without them. webuiapi's defaults (false, 0, None, equal blurs) pass."""
    if payload.restore_faces:
        raise ValueError("restore_faces is not supported yet (Easel has no face restoration); "
                         "send restore_faces: false")
    hr_scheduler = getattr(payload, "hr_scheduler", None)
    # The hires pass always runs on the first pass's schedule (pipelines/hires.py), so only a
    # value meaning that schedule is honoured.
    if hr_scheduler not in (None, "", "Use same scheduler") and (
            _schedule_label(hr_scheduler) != _schedule_label(payload.scheduler)):
        raise ValueError(f"hr_scheduler '{hr_scheduler}' is not supported: the hires pass uses the first pass's "
                         f"scheduler ('{payload.scheduler or 'Automatic'}'); send hr_scheduler: \"Use same scheduler\" "
                         "or set scheduler instead")
    if isinstance(payload, Img2ImgRequest) and payload.mask_blur is None and payload.mask_blur_x != payload.mask_blur_y:
        raise ValueError(f"mask_blur_x ({payload.mask_blur_x}) and mask_blur_y ({payload.mask_blur_y}) differ, but "
                         "Easel blurs the mask equally both ways; send mask_blur, or equal mask_blur_x and mask_blur_y")


def request_fields() -> set[str]:
    return {f.name for f in fields(GenerationRequest)}


def _common(payload: _Processing, options: ApiOptions, limits: ImageLimits) -> dict[str, Any]:
    from api import scripts
    scripts.check_script_name(payload.script_name)
    check_unsupported(payload)
    overrides = payload.override_settings or {}
    resolved = options.resolve(overrides)  # validates checkpoint/VAE/clip skip names
    checkpoint = resolved.get(CHECKPOINT) or options.checkpoint().name
    values: dict[str, Any] = dict(
        prompt=payload.prompt or "",
        negative_prompt=payload.negative_prompt or "",
        checkpoint=checkpoint,
        vae=resolved.get(VAE, options.vae),
        sampler=payload.sampler_name or payload.sampler_index or "Euler",
        schedule=payload.scheduler or "Automatic",
        steps=payload.steps, cfg_scale=payload.cfg_scale,
        width=payload.width, height=payload.height, seed=payload.seed,
        batch_count=payload.n_iter, batch_size=payload.batch_size,
        save_images=bool(payload.save_images),
    )
    known = request_fields()
    if "clip_skip" in known:
        values["clip_skip"] = resolved.get(CLIP_SKIP, options.clip_skip)
    for name in _OPTIONAL_FIELDS:
        value = getattr(payload, name, None)
        if name in known and value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    for api_name, field_name in _RENAMED_OPTIONAL.items():
        value = getattr(payload, api_name, None)
        if field_name in known and value is not None:
            values[field_name] = value
    # ControlNet units from alwayson_scripts (the control lane's ControlUnit.from_a1111).
    values.update(scripts.request_values(payload.alwayson_scripts, known, limits))
    return values


def txt2img_request(payload: Txt2ImgRequest, options: ApiOptions,
                    limits: ImageLimits = ImageLimits(), additions: EngineAdditions | None = None) -> GenerationRequest:
    """`additions`: the app's extension samplers/preprocessors, so their names are accepted."""
    values = _common(payload, options, limits)
    if payload.denoising_strength is not None:  # the hires fix's second pass
        values["denoising_strength"] = payload.denoising_strength
    return GenerationRequest(task="txt2img", additions=additions, **values)


def img2img_request(payload: Img2ImgRequest, options: ApiOptions,
                    limits: ImageLimits = ImageLimits(), additions: EngineAdditions | None = None) -> GenerationRequest:
    if not payload.init_images:
        raise ValueError("init_images must hold at least one base64 image")
    init = decode_image(payload.init_images[0], "init_images[0]", limits).convert("RGB")
    mask = decode_image(payload.mask, "mask", limits) if payload.mask else None
    if payload.resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill), "
                         f"got {payload.resize_mode}")
    if mask is not None and payload.inpainting_fill not in MASKED_CONTENT:
        raise ValueError(f"inpainting_fill must be 0 (fill) or 1 (original); latent noise/nothing are not "
                         f"supported, got {payload.inpainting_fill}")
    blur = payload.mask_blur if payload.mask_blur is not None else payload.mask_blur_x
    return GenerationRequest(
        task="inpaint" if mask is not None else "img2img",
        init_image=init, mask=mask,
        denoising_strength=0.75 if payload.denoising_strength is None else payload.denoising_strength,
        resize_mode=RESIZE_MODES[payload.resize_mode],
        mask_blur=blur,
        inpainting_fill=MASKED_CONTENT.get(payload.inpainting_fill, "original"),
        inpaint_full_res=bool(payload.inpaint_full_res),
        inpaint_full_res_padding=payload.inpaint_full_res_padding,
        inpainting_mask_invert=bool(payload.inpainting_mask_invert),
        additions=additions, **_common(payload, options, limits))


def echo_parameters(payload: _Processing) -> dict[str, Any]:
    """`parameters`: the request as A1111 echoes it (init images and mask left out unless
    include_init_images)."""
    data = payload.model_dump()
    if isinstance(payload, Img2ImgRequest) and not payload.include_init_images:
        data["init_images"] = None
        data["mask"] = None
    return data


def response(payload: _Processing, request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    images = ([encode_png(image, text) for image, text in zip(result.images, result.infotexts)]
              if payload.send_images else [])
    return {"images": images, "parameters": echo_parameters(payload),
            "info": json.dumps(info_dict(payload, request, result), ensure_ascii=False)}


def info_dict(payload: _Processing, request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    """A1111's `Processed.js()` keys, filled from the request and the first image's infotext."""
    split = [split_infotext(text) for text in result.infotexts]
    parsed = split[0][2] if split else {}
    seed = result.seeds[0] if result.seeds else request.seed
    # Each image's own prompts (styles and wildcards resolved), as A1111's all_prompts are.
    all_prompts = [prompt for prompt, _negative, _params in split]
    all_negatives = [negative for _prompt, negative, _params in split]
    return {
        "prompt": request.prompt,  # as the user wrote it (A1111: p.prompt)
        "all_prompts": all_prompts,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": all_negatives,
        "seed": seed,
        "all_seeds": list(result.seeds),
        "subseed": result.subseeds[0] if result.subseeds else request.subseed,
        "all_subseeds": list(result.subseeds),
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": parsed.get("Model"),
        "sd_model_hash": parsed.get("Model hash"),
        "sd_vae_name": parsed.get("VAE"),
        "sd_vae_hash": parsed.get("VAE hash"),
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None if request.task == "txt2img" else request.denoising_strength,
        "extra_generation_params": {k: v for k, v in parsed.items() if k not in _CORE_INFOTEXT_KEYS},
        "index_of_first_image": 0,
        "infotexts": list(result.infotexts),
        "styles": list(payload.styles or []),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": getattr(request, "clip_skip", 1),
        "is_using_inpainting_conditioning": False,
        "version": parsed.get("Version"),
        "interrupted": result.interrupted,
        "warnings": list(result.warnings),  # Easel: e.g. LoRA layers that did not match the checkpoint
    }
