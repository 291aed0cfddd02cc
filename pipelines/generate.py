"""Run one GenerationRequest: seeds, progress/preview/interrupt callbacks, decoding, infotext
and saving. The sampling loop is diffusers' own; we only drive it through its callbacks."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from pipelines import faults, hires, imageops, memory, refiner, samplers, tiling, variation
from pipelines.adapters import attach as adapters
from pipelines.control import apply as control
from pipelines.hooks import NO_HOOKS, GenerationHooks, StepInfo
from pipelines.jobs import CancelToken, Progress, ProgressSink
from pipelines.manager import ActivePipeline, PipelineManager
from pipelines.metadata import format_infotext
from pipelines.outputs import OutputStore
from pipelines.preview import latent_preview
from pipelines.prompts.conditioning import EncodingCache, build_conditioning
from pipelines.prompts.parser import uses_emphasis
from pipelines.prompts.source import ImagePrompt, PromptSource
from pipelines.request import GenerationRequest, GenerationResult
from pipelines.version import INFOTEXT_VERSION

PREVIEW_EVERY = 2  # steps between live previews
COMPILE_NOTE = "fast mode: compiling for this image size, once"
PREVIEW_MIN_INTERVAL_S = 0.3  # and at most ~3 a second: on fast models previews were 20% of the time
_CATEGORY = {"txt2img": "txt2img-images", "img2img": "img2img-images", "inpaint": "img2img-images"}
log = logging.getLogger("easel.generate")


def resolve_seed(seed: int, rng: random.Random | None = None) -> int:
    return seed if seed != -1 else (rng or random.SystemRandom()).randrange(0, 2**32)


def generate(manager: PipelineManager, outputs: OutputStore | None, request: GenerationRequest,
             progress: ProgressSink | None = None, cancel: CancelToken | None = None,
             hooks: GenerationHooks = NO_HOOKS, prompts: PromptSource | None = None) -> GenerationResult:
    """`prompts` applies styles and wildcards (the app passes the data dir's); without it a
    request's prompt is used as written."""
    progress = progress or (lambda _p: None)
    cancel = cancel or CancelToken()
    request = hooks.before_generate(request)
    base_seed = resolve_seed(request.seed)
    # resolved once here like seed, so every batch and the infotext see the same variation seed
    request = request.with_changes(subseed=resolve_seed(request.subseed))
    # styles become part of the request's prompt (A1111: before anything parses it); wildcards per image
    prompts = prompts or PromptSource()
    request, image_prompts = prompts.prepare(request, base_seed)
    encodings = EncodingCache()  # each prompt text encoded once per request, whatever the batch count
    images, infotexts, seeds, subseeds, paths = [], [], [], [], []
    loads_before = sum(manager.load_counts.values())
    wishes = adapters.wishes_for(request, image_prompts)
    with manager.pipeline(request.task, request.checkpoint, request.vae, loras=wishes.loras) as active, \
            control.attach(manager, active, request) as (active, control_kwargs), \
            adapters.attach(manager, active, request, wishes) as adapter_params, \
            memory.vae_tiling(active.pipe.vae, manager.memory.wants_vae_tiling(*memory.final_size(request))), \
            tiling.for_pipeline(active.pipe, request.tiling):  # denoising and decode; restored after
        if sum(manager.load_counts.values()) != loads_before:
            hooks.model_loaded(manager.snapshot())
        warnings = adapters.warnings_of(active)
        params_common = hooks.extend_infotext(
            request, _infotext_params(manager, active, request) | control.infotext_params(manager, request)
            | (hires.infotext_params(request, manager) if request.enable_hr else {}) | refiner.infotext_params(manager, request)
            | adapter_params)
        for batch_index in range(request.batch_count):
            if cancel.cancelled:
                break
            batch_seeds = [base_seed + batch_index * request.batch_size + i for i in range(request.batch_size)]
            batch_prompts = image_prompts[batch_index * request.batch_size:(batch_index + 1) * request.batch_size]
            if manager.fast.compile_pending((request.task, request.width, request.height, request.batch_size)):
                progress(Progress(step=0, total_steps=request.steps, batch_index=batch_index,
                                  batch_count=request.batch_count, note=COMPILE_NOTE))
            batch = _run_batch_or_retry_sliced(
                active, request, batch_seeds, batch_index, progress, cancel, control_kwargs, hooks, manager,
                batch_prompts, encodings, prompts.sdxl_clip_l_skip)
            cancel.batch_done()  # a Skip ended this batch only; the next one samples in full
            batch_subseeds = _batch_subseeds(request, batch_index)
            for image, seed, subseed, image_prompt in zip(batch, batch_seeds, batch_subseeds, batch_prompts):
                image = hooks.after_image(image, request)
                params = {**params_common, "Seed": seed}
                if request.subseed_strength > 0:  # A1111 writes both only when variation is on
                    params |= {"Variation seed": subseed, "Variation seed strength": _number(request.subseed_strength)}
                params = {k: params[k] for k in _ordered_keys(params)}
                text = format_infotext(image_prompt.prompt, image_prompt.negative_prompt, params)
                images.append(image)
                infotexts.append(text)
                seeds.append(seed)
                subseeds.append(subseed)
                if outputs is not None and request.save_images:
                    paths.append(outputs.save(image, category=_CATEGORY[request.task], seed=seed, infotext=text))
                    hooks.image_saved(paths[-1], text)
    return GenerationResult(images=images, infotexts=infotexts, seeds=seeds, paths=paths,
                            interrupted=cancel.cancelled, warnings=warnings, subseeds=subseeds)


def _batch_subseeds(request: GenerationRequest, batch_index: int) -> list[int]:
    """Image i of the request gets subseed + i, as its seed is seed + i (A1111)."""
    first = request.subseed + batch_index * request.batch_size
    return [first + i for i in range(request.batch_size)]


# --- one batch -----------------------------------------------------------------------------

def _run_batch_or_retry_sliced(active: ActivePipeline, *args) -> list[Image.Image]:
    """One batch; when it runs out of memory, once more with sliced attention and VAE slicing
    (taken off again after). A second out-of-memory error goes to the job as usual."""
    try:
        return _run_batch(active, *args)
    except Exception as exc:
        if not faults.is_out_of_memory(exc):
            raise
        exc.__traceback__ = None  # its frames hold the tensors that filled the memory
    log.warning("out of memory: trying the batch again with attention and VAE slicing")
    faults.free_device_memory()
    with memory.sliced_for_retry(active.pipe):
        return _run_batch(active, *args)


def _run_batch(active: ActivePipeline, request: GenerationRequest, seeds: list[int], batch_index: int,
               progress: ProgressSink, cancel: CancelToken, extra: dict | None = None,
               hooks: GenerationHooks = NO_HOOKS, manager: PipelineManager | None = None,
               prompts: list[ImagePrompt] | None = None, encodings: EncodingCache | None = None,
               sdxl_clip_l_skip: bool = False) -> list[Image.Image]:
    pipe = active.pipe
    # seed: DPM++ SDE draws its Brownian noise from it, so the same seed gives the same image.
    pipe.scheduler = samplers.make_scheduler(request.sampler, request.schedule, dict(pipe.scheduler.config),
                                             seed=seeds[0], table=request.additions.samplers)
    # CPU generators: the same seed gives the same noise on every device (A1111 "RNG: CPU").
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    # A1111 prompt language: weights, chunks, clip skip; editing switched from the step callback
    prompts = prompts or [ImagePrompt(request.prompt, request.negative_prompt)] * len(seeds)
    conditioning = build_conditioning(pipe, [p.prompt for p in prompts], [p.negative_prompt for p in prompts],
                                      steps=_sampling_steps(request), clip_skip=request.clip_skip,
                                      emphasis=request.emphasis, sdxl_clip_l_skip=sdxl_clip_l_skip,
                                      cache=encodings)
    conditioning.install(pipe)  # AND (composable diffusion) wraps this request's UNet until finish()
    callback = _step_callback(active, request, batch_index, progress, cancel, hooks, tuple(seeds),
                              conditioning.callback_outputs)
    common: dict[str, Any] = dict(
        **conditioning.pipeline_kwargs(),
        num_inference_steps=request.steps, guidance_scale=request.cfg_scale, generator=generators,
        output_type="latent", callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", *conditioning.tensor_inputs],
        **(extra or {}))

    if request.task == "txt2img":
        if request.subseed_strength > 0:  # strength 0 leaves the noise to diffusers: bit for bit as before
            common["latents"] = variation.initial_noise(
                generators, _batch_subseeds(request, batch_index), request.subseed_strength,
                variation.latent_shape(pipe, request.width, request.height), pipe.unet.dtype)
        if refiner.wanted(request):
            latents = refiner.run(manager, active, request, seeds, common, callback, prompts,
                                  sdxl_clip_l_skip=sdxl_clip_l_skip, encodings=encodings)
        else:
            latents = pipe(width=request.width, height=request.height, **common).images
        conditioning.finish()  # a hires pass encodes its own prompt
        if request.enable_hr and not cancel.cancelled and not cancel.skipping:
            return hires.run_second_pass(manager, active, request, latents, seeds, callback, decode_latents,
                                         prompts, sdxl_clip_l_skip=sdxl_clip_l_skip, encodings=encodings)
        return decode_latents(pipe.vae, latents)

    init = imageops.resize_image(request.init_image.convert("RGB"), request.width, request.height,
                                 request.resize_mode)
    if request.task == "img2img":
        if int(request.steps * request.denoising_strength) == 0:
            return [roundtrip_through_vae(pipe.vae, init) for _ in seeds]  # nothing to denoise
        latents = pipe(image=init, strength=request.denoising_strength, **common).images
        return decode_latents(pipe.vae, latents)
    return _inpaint(pipe, request, init, common, len(seeds))


def _inpaint(pipe, request: GenerationRequest, init: Image.Image, common: dict, count: int) -> list[Image.Image]:
    mask = imageops.resize_image(request.mask.convert("RGBA") if request.mask.mode == "RGBA" else request.mask.convert("RGB"),
                                 request.width, request.height, request.resize_mode)
    mask = imageops.prepare_mask(mask, blur=request.mask_blur, invert=request.inpainting_mask_invert)
    if not np.asarray(mask).any():
        raise ValueError("the mask is empty: paint the area to change, or untick 'invert mask'")
    source, source_mask, box = init, mask, None
    if request.inpaint_full_res:
        box = imageops.masked_crop_region(mask, request.inpaint_full_res_padding, init.width, init.height,
                                          request.width, request.height)
        source = init.crop(box).resize((request.width, request.height), Image.LANCZOS)
        source_mask = mask.crop(box).resize((request.width, request.height), Image.LANCZOS)
    if request.inpainting_fill == "fill":
        source = fill_masked_area(source, source_mask)
    if int(request.steps * request.denoising_strength) == 0:
        generated = [roundtrip_through_vae(pipe.vae, source) for _ in range(count)]
    else:
        latents = pipe(image=source, mask_image=source_mask, strength=request.denoising_strength,
                       width=request.width, height=request.height, **common).images
        generated = decode_latents(pipe.vae, latents)
    if box is not None:
        return [imageops.paste_back(init, g, box, mask) for g in generated]
    # Outside the mask the picture stays the original, pixel for pixel (A1111's overlay).
    return [imageops.composite_masked(init, g, mask) for g in generated]


def fill_masked_area(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": replace the masked area with the blurred colours around it, so the model
    starts from the surroundings' palette instead of the old content."""
    keep = Image.eval(mask.convert("L"), lambda v: 255 if v < 128 else 0)
    filled = Image.new("RGB", image.size, _mean_colour(image, keep))
    for radius in (256, 64, 16, 4, 1):
        blurred = image.filter(ImageFilter.GaussianBlur(radius))
        blurred_keep = keep.filter(ImageFilter.GaussianBlur(radius))
        weight = np.asarray(blurred_keep, dtype=np.float32)[..., None] / 255.0
        colour = np.asarray(blurred, dtype=np.float32) / np.maximum(weight, 1e-3)
        layer = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8), "RGB")
        filled = Image.composite(layer, filled, blurred_keep.point(lambda v: 255 if v > 8 else 0))
    return Image.composite(image, filled, keep)


def _mean_colour(image: Image.Image, keep: Image.Image) -> tuple[int, int, int]:
    pixels = np.asarray(image, dtype=np.float32)[np.asarray(keep) > 0]
    if not len(pixels):
        return (127, 127, 127)
    return tuple(int(v) for v in pixels.mean(axis=0))


# --- progress --------------------------------------------------------------------------------

def _sampling_steps(request: GenerationRequest) -> int:
    """Steps the sampler really runs (img2img/inpaint run only the tail): the prompt-editing base."""
    if request.task == "txt2img":
        return request.steps
    return max(1, int(request.steps * request.denoising_strength))


def _step_callback(active: ActivePipeline, request: GenerationRequest, batch_index: int,
                   progress: ProgressSink, cancel: CancelToken, hooks: GenerationHooks = NO_HOOKS,
                   seeds: tuple[int, ...] = (), tensor_updates=lambda _pipe, _step: {}):
    last_preview = [float("-inf")]  # the first due preview is always shown

    def on_step_end(pipe, step: int, _timestep, tensors: dict) -> dict:
        total = getattr(pipe, "num_timesteps", None) or request.steps
        preview = None
        # none after the last step: the decoded image follows at once
        if (step + 1) % PREVIEW_EVERY == 0 and step + 1 < total and "latents" in tensors \
                and time.monotonic() - last_preview[0] >= PREVIEW_MIN_INTERVAL_S:
            preview = latent_preview(pipe.vae, tensors["latents"][0], sdxl=active.arch.is_sdxl)
            last_preview[0] = time.monotonic()
        progress(Progress(step=step + 1, total_steps=total, batch_index=batch_index,
                          batch_count=request.batch_count, preview=preview))
        hooks.on_step(StepInfo(step=step + 1, total_steps=total, batch_index=batch_index,
                               batch_count=request.batch_count, seeds=seeds, request=request))
        if cancel.cancelled or cancel.skipping:
            pipe._interrupt = True  # diffusers skips the remaining steps; we decode what we have
        return tensor_updates(pipe, step)
    return on_step_end


# --- VAE ---------------------------------------------------------------------------------------

@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Decode with the fp16-VAE NaN guard: a non-finite result is decoded again in fp32
    (the SD1/SDXL VAEs overflow in half precision on some inputs), never a black image."""
    scaled = latents / vae.config.scaling_factor
    images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    if not torch.isfinite(images).all() and vae.dtype != torch.float32:
        original = vae.dtype
        vae.to(torch.float32)
        try:
            images = vae.decode(scaled.float(), return_dict=False)[0]
        finally:
            vae.to(original)
    return tensor_to_images(images)


@torch.no_grad()
def encode_image(vae, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    pixels = pixels.permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


def roundtrip_through_vae(vae, image: Image.Image) -> Image.Image:
    return decode_latents(vae, encode_image(vae, image))[0]


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.float().cpu().permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round()
    return [Image.fromarray(a.numpy().astype(np.uint8), "RGB") for a in array]


# --- infotext --------------------------------------------------------------------------------

_KEY_ORDER = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
              "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength", "Clip skip",
              "RNG", "Mask blur", "Mask mode", "Inpaint area", "Masked area padding", "Masked content", "Lora hashes", "TI hashes", "Version"]


def _ordered_keys(params: dict) -> list[str]:
    return [k for k in _KEY_ORDER if k in params] + [k for k in params if k not in _KEY_ORDER]


def _infotext_params(manager: PipelineManager, active: ActivePipeline, request: GenerationRequest) -> dict:
    registry = manager.registry
    params: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": request.schedule,
        "CFG scale": _number(request.cfg_scale),
        "Size": f"{request.width}x{request.height}",
        "Model hash": registry.shorthash(active.checkpoint),
        "Model": Path(active.checkpoint.name).stem,
    }
    if active.vae is not None:
        params["VAE hash"] = registry.shorthash(active.vae)
        params["VAE"] = Path(active.vae.name).name
    if request.task != "txt2img":
        params["Denoising strength"] = _number(request.denoising_strength)
    if request.clip_skip > 1:  # A1111 writes it only when it is not the default
        params["Clip skip"] = request.clip_skip
    if request.tiling:
        params["Tiling"] = True  # A1111 writes it only when on
    if request.emphasis != "Original" and (uses_emphasis(request.prompt) or uses_emphasis(request.negative_prompt)):
        params["Emphasis"] = request.emphasis  # A1111: only a non-default mode that matters
    if request.task == "inpaint":
        params["Mask blur"] = request.mask_blur
        if request.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        params["Inpaint area"] = "Only masked" if request.inpaint_full_res else "Whole picture"
        if request.inpaint_full_res:
            params["Masked area padding"] = request.inpaint_full_res_padding
        params["Masked content"] = request.inpainting_fill
    params["RNG"] = "CPU"
    params["Version"] = INFOTEXT_VERSION
    return params


def _number(value: float):
    return int(value) if float(value).is_integer() else value
