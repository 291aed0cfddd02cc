"""Hires fix (A1111's two-pass txt2img): generate at the request size, upscale the latents (latent
modes) or the decoded image (Lanczos, Nearest, a model), then run img2img at the target size.

The second pass may use its own checkpoint, sampler, prompt and negative prompt. Its number of
denoising steps is `hr_second_pass_steps` (or the first pass's steps) exactly, as A1111 does,
whatever the denoising strength. Request fields use A1111's API names.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from PIL import Image

from pipelines import loading, samplers, tiling, upscalers
from pipelines.adapters.lora_stack import requests_of

SAME_CHECKPOINT = "Use same checkpoint"
SAME_SAMPLER = "Use same sampler"
MAX_SIZE = 4096


def same_checkpoint(value: str | None) -> bool:
    return not value or value == SAME_CHECKPOINT


def same_sampler(value: str | None) -> bool:
    return not value or value == SAME_SAMPLER


def problems(request: Any) -> Iterator[str]:
    """Validation of the hires and refiner fields of a GenerationRequest."""
    if not 0.0 <= request.refiner_switch_at <= 1.0:
        yield f"refiner switch at must be between 0 and 1, got {request.refiner_switch_at}"
    if not request.enable_hr:
        return
    if request.task != "txt2img":
        yield "hires fix is a txt2img option; use img2img's own size for img2img"
        return
    if not 1.0 <= request.hr_scale <= 8.0:
        yield f"hires upscale must be between 1 and 8, got {request.hr_scale}"
    if not 0 <= request.hr_second_pass_steps <= 500:
        yield f"hires steps must be between 0 (same as steps) and 500, got {request.hr_second_pass_steps}"
    for name in ("hr_resize_x", "hr_resize_y"):
        value = getattr(request, name)
        if not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
            yield f"{name} must be 0 (use the scale) or a size up to {MAX_SIZE}, got {value}"
    if not request.hr_upscaler:
        yield "choose a hires upscaler (Latent, Lanczos, Nearest or a model)"
    if not same_sampler(request.hr_sampler):
        try:
            samplers.resolve(request.hr_sampler, request.schedule, request.additions.samplers)
        except ValueError as exc:
            yield f"hires sampler: {exc}"
    try:
        width, height = target_size(request)
    except ValueError as exc:
        yield str(exc)
        return
    if width > MAX_SIZE or height > MAX_SIZE:
        yield f"hires target {width}x{height} is larger than {MAX_SIZE}; lower the upscale or the size"


def target_size(request: Any) -> tuple[int, int]:
    """A1111's hires size: scale x the first pass, or `hr_resize_x/y` (one of them 0 keeps the
    aspect ratio), rounded down to a multiple of 8 (the latent grid)."""
    width, height = request.width, request.height
    x, y = request.hr_resize_x, request.hr_resize_y
    if x == 0 and y == 0:
        w, h = int(width * request.hr_scale), int(height * request.hr_scale)
    elif y == 0:
        w, h = x, x * height // width
    elif x == 0:
        w, h = y * width // height, y
    else:
        w, h = x, y
    w, h = w // 8 * 8, h // 8 * 8
    if w < 64 or h < 64:
        raise ValueError(f"hires target {w}x{h} is too small: at least 64x64")
    return w, h


def second_pass_steps(request: Any) -> int:
    return request.hr_second_pass_steps or request.steps


def infotext_params(request: Any, manager: Any) -> dict[str, Any]:
    """The A1111 infotext keys a hires generation adds, in A1111's order and spelling: "Hires
    resize" as the requested `hr_resize_x`x`hr_resize_y` (a 0 stays 0), "Hires checkpoint" as
    `name [shorthash]`."""
    params: dict[str, Any] = {"Denoising strength": _number(request.denoising_strength)}
    if request.hr_resize_x or request.hr_resize_y:
        params["Hires resize"] = f"{request.hr_resize_x}x{request.hr_resize_y}"
    else:
        params["Hires upscale"] = _number(request.hr_scale)
    if request.hr_second_pass_steps:
        params["Hires steps"] = request.hr_second_pass_steps
    params["Hires upscaler"] = request.hr_upscaler
    if not same_checkpoint(request.hr_checkpoint):
        params["Hires checkpoint"] = manager.registry.infotext_title("checkpoint", request.hr_checkpoint)
    if not same_sampler(request.hr_sampler):
        params["Hires sampler"] = request.hr_sampler
    if request.hr_prompt and request.hr_prompt != request.prompt:
        params["Hires prompt"] = request.hr_prompt
    if request.hr_negative_prompt and request.hr_negative_prompt != request.negative_prompt:
        params["Hires negative prompt"] = request.hr_negative_prompt
    return params


def img2img_total_steps(steps: int, strength: float) -> int:
    """The `num_inference_steps` to give diffusers' img2img so that it samples exactly `steps`
    (A1111's "Hires steps" are the steps actually sampled). diffusers samples
    `int(total * strength)` of a `total`-step schedule; the smallest such total is returned."""
    if strength >= 1.0:
        return steps
    total = max(steps, int(steps / strength) - 1)
    while int(total * strength) < steps:  # each +1 adds strength < 1: it lands on steps exactly
        total += 1
    return total


def run_second_pass(manager: Any, active: Any, request: Any, latents: torch.Tensor, seeds: list[int],
                    callback: Callable, decode: Callable[[Any, torch.Tensor], list[Image.Image]],
                    prompts: list | None = None, sdxl_clip_l_skip: bool = False,
                    encodings: Any = None) -> list[Image.Image]:
    """The hires pass over a batch's first-pass latents; returns the final images. `prompts`:
    the batch's per-image prompts (ImagePrompt: styles and wildcards applied), else the request's;
    `sdxl_clip_l_skip` and `encodings` (the request's EncodingCache) as for the first pass."""
    width, height = target_size(request)
    strength = request.denoising_strength
    steps = second_pass_steps(request)
    latent_mode = upscalers.is_latent(request.hr_upscaler)
    if latent_mode:
        source: Any = upscalers.upscale_latents(latents, request.hr_upscaler, height, width,
                                                    active.pipe.vae_scale_factor)
        if strength == 0:
            return decode(active.pipe.vae, source)
    else:
        tool = upscalers.Upscalers.for_manager(manager)
        source = [tool.upscale(image, width, height, request.hr_upscaler)
                  for image in decode(active.pipe.vae, latents)]
        if strength == 0:
            return source  # nothing to denoise: the upscaled first pass, as it is

    with _second_pass_pipeline(manager, active, request, latent_mode) as pipe:
        sampler = request.sampler if same_sampler(request.hr_sampler) else request.hr_sampler
        pipe.scheduler = samplers.make_scheduler(sampler, request.schedule, dict(pipe.scheduler.config), seed=seeds[0],
                                                 table=request.additions.samplers)
        total = img2img_total_steps(steps, strength)
        conditioning = _conditioning(pipe, request, prompts, len(seeds), steps, sdxl_clip_l_skip, encodings)

        output = pipe(image=source, strength=strength, num_inference_steps=total, **conditioning.pipeline_kwargs(),
                      guidance_scale=request.cfg_scale,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                      output_type="latent", callback_on_step_end=conditioning.chained(callback),
                      callback_on_step_end_tensor_inputs=["latents", *conditioning.tensor_inputs]).images
        conditioning.finish()
        return decode(pipe.vae, output)


def _conditioning(pipe: Any, request: Any, prompts: list | None, count: int, steps: int,
                  sdxl_clip_l_skip: bool = False, encodings: Any = None):
    """The hires pass's prompts in the A1111 prompt language, encoded by the hires pipeline's
    own text encoders (its checkpoint may differ) with the first pass's encoding options
    (emphasis, clip skip, SDXL CLIP-L skip); editing schedules count the hires steps."""
    from pipelines.prompts.conditioning import build_conditioning

    positives = [p.prompt for p in prompts] if prompts else [request.prompt] * count
    negatives = [p.negative_prompt for p in prompts] if prompts else [request.negative_prompt] * count
    if request.hr_prompt:
        positives = [request.hr_prompt] * count
    if request.hr_negative_prompt:
        negatives = [request.hr_negative_prompt] * count
    # the cache is keyed by text encoder and options, so another hires checkpoint encodes afresh
    return build_conditioning(pipe, positives, negatives, steps=steps, clip_skip=request.clip_skip,
                              emphasis=request.emphasis, sdxl_clip_l_skip=sdxl_clip_l_skip, cache=encodings)


@contextmanager
def _second_pass_pipeline(manager: Any, active: Any, request: Any, latent_mode: bool):
    if same_checkpoint(request.hr_checkpoint):
        yield loading.pipeline_class(active.arch, "img2img").from_pipe(active.pipe, torch_dtype=manager.dtype)
        return
    loras = requests_of(getattr(active, "loras", []))  # the request's LoRAs apply to both passes (A1111)
    try:
        with manager.pipeline("img2img", request.hr_checkpoint, request.vae, loras=loras) as hires_active, \
                tiling.for_pipeline(hires_active.pipe, request.tiling):  # another model: tiled as well
            if latent_mode and hires_active.arch.is_sdxl != active.arch.is_sdxl:
                raise ValueError("a latent hires upscaler needs a hires checkpoint of the same family; "
                                 "choose Lanczos or a model upscaler")
            yield hires_active.pipe
    finally:
        # The first-pass model back on the device for the next batch (a cache hit, no load). Not a
        # second pipeline() on it: its LoRA selection (fused or not) belongs to the outer block.
        manager.reactivate(active)


def _number(value: float):
    return int(value) if float(value).is_integer() else value
