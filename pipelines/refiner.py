"""SDXL refiner (A1111's "Refiner" with "Switch at"): the base model denoises the first part of
the schedule (`denoising_end`), the refiner the rest (`denoising_start`), handed over as latents.

The refiner is loaded through the manager's byte-budgeted cache under its own key, locked and
on the device only while it runs, so base and refiner are both cached without being resident
on the device together.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from pipelines import configs, samplers, tiling
from pipelines.arch import Arch
from pipelines.cache import module_bytes
from pipelines.registry import ModelEntry

REFINER_ARCHS = (Arch.SDXL_REFINER, Arch.SDXL)


def wanted(request: Any) -> bool:
    """A refiner is used when one is named and the switch comes before the end."""
    return bool(request.refiner_checkpoint) and request.refiner_switch_at < 1.0


def problems(request: Any) -> Iterator[str]:
    if request.refiner_checkpoint and request.task != "txt2img":
        yield "the refiner is a txt2img option here; leave it empty for img2img"


@dataclass
class LoadedRefiner:
    entry: ModelEntry
    components: dict[str, Any]

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.components.items() if isinstance(v, torch.nn.Module)}


def load_refiner(entry: ModelEntry, dtype: torch.dtype) -> LoadedRefiner:
    """An SDXL refiner (or an SDXL base used as one) as img2img components, on the CPU, offline."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if entry.arch not in REFINER_ARCHS:
        raise ValueError(f"{entry.name} is {entry.arch.value}; the refiner must be an SDXL refiner or SDXL model")
    tokenizers = {"tokenizer_2": configs.load_tokenizer(pad_with_bang=True)}
    if entry.arch is Arch.SDXL:
        tokenizers["tokenizer"] = configs.load_tokenizer()
    try:
        if entry.format == "diffusers":
            present = {k: v for k, v in tokenizers.items() if not (entry.path / k).is_dir()}
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(entry.path, local_files_only=True,
                                                                    torch_dtype=dtype, **present)
        else:
            pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
                str(entry.path), config=str(configs.config_dir(entry.arch)), local_files_only=True,
                torch_dtype=dtype, **tokenizers)
    except Exception as exc:
        raise ValueError(f"refiner {entry.name} could not be loaded: {str(exc).splitlines()[0][:300]}") from exc
    components = {k: v for k, v in pipe.components.items() if v is not None}
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    components["requires_aesthetics_score"] = bool(pipe.config.get("requires_aesthetics_score", False))
    return LoadedRefiner(entry=entry, components=components)


@contextmanager
def refiner_pipeline(manager: Any, name: str, dtype: torch.dtype | None = None):
    """A fresh StableDiffusionXLImg2ImgPipeline over the cached refiner, on the device while used."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    entry = manager.registry.find("checkpoint", name)
    if entry.arch not in REFINER_ARCHS:
        raise ValueError(f"{entry.name} is {entry.arch.value}; choose an SDXL refiner (or SDXL) model as refiner")
    key = ("refiner", str(entry.path), entry.mtime, entry.size)
    loaded = manager.cache.get_or_load(key, lambda: load_refiner(entry, dtype or manager.dtype),
                                       size_of=lambda r: module_bytes(r.modules))
    manager.cache.lock(key)
    try:
        _move(loaded.modules.values(), manager.device)
        kwargs = {k: v for k, v in loaded.components.items() if k != "requires_aesthetics_score"}
        kwargs.setdefault("text_encoder", None)
        kwargs.setdefault("tokenizer", None)
        yield StableDiffusionXLImg2ImgPipeline(
            **kwargs, requires_aesthetics_score=loaded.components["requires_aesthetics_score"])
    finally:
        if manager.device.type != "cpu":
            _move(loaded.modules.values(), torch.device("cpu"))  # make room for the base model
        manager.cache.unlock(key)


def run(manager: Any, active: Any, request: Any, seeds: list[int], common: dict[str, Any],
        callback: Callable, prompts: list | None = None, sdxl_clip_l_skip: bool = False,
        encodings: Any = None) -> torch.Tensor:
    """Base to `refiner_switch_at`, refiner from there; returns the final latents. The refiner
    encodes the prompts in the A1111 prompt language with its own OpenCLIP-G encoder (weights,
    long prompts in chunks, BREAK, AND, editing) and the request's encoding options; its editing
    schedule continues the base's steps, as A1111's refiner does."""
    from pipelines.prompts.conditioning import build_conditioning

    if not active.arch.is_sdxl:
        raise ValueError("the refiner hands over SDXL latents; choose an SDXL base checkpoint")
    pairs = ([(p.prompt, p.negative_prompt) for p in prompts] if prompts
             else [(request.prompt, request.negative_prompt)] * len(seeds))
    switch = float(request.refiner_switch_at)
    latents = active.pipe(width=request.width, height=request.height, denoising_end=switch, **common).images
    first_step = _first_refiner_step(active.pipe, request.steps)
    with refiner_pipeline(manager, request.refiner_checkpoint) as pipe, tiling.for_pipeline(pipe, request.tiling):
        pipe.scheduler = samplers.make_scheduler(request.sampler, request.schedule, dict(pipe.scheduler.config),
                                                 seed=seeds[0], table=request.additions.samplers)
        # the cache is keyed by text encoder, so the refiner's CLIP-G never gets the base's tensors
        conditioning = build_conditioning(pipe, [p for p, _ in pairs], [n for _, n in pairs], steps=request.steps,
                                          clip_skip=request.clip_skip, emphasis=request.emphasis,
                                          sdxl_clip_l_skip=sdxl_clip_l_skip, cache=encodings, first_step=first_step)
        conditioning.install(pipe)  # AND wraps the refiner's UNet for this pass only
        try:
            return pipe(image=latents, denoising_start=switch, num_inference_steps=request.steps,
                        **conditioning.pipeline_kwargs(), guidance_scale=request.cfg_scale,
                        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                        output_type="latent", callback_on_step_end=conditioning.chained(callback),
                        callback_on_step_end_tensor_inputs=["latents", *conditioning.tensor_inputs]).images
        finally:
            conditioning.finish()


def _first_refiner_step(base_pipe: Any, steps: int) -> int:
    """The 1-based step the refiner starts at: the base's model calls over the full schedule's
    (so second-order samplers count too)."""
    full = len(base_pipe.scheduler.timesteps) or 1
    return min(steps, int(base_pipe.num_timesteps * steps / full) + 1)


def infotext_params(manager: Any, request: Any) -> dict[str, Any]:
    if not request.refiner_checkpoint:
        return {}
    return {"Refiner": manager.registry.infotext_title("checkpoint", request.refiner_checkpoint),
            "Refiner switch at": request.refiner_switch_at}


def _move(modules, device: torch.device) -> None:
    if device.type == "cpu" and all(p.device.type == "cpu" for m in modules for p in m.parameters()):
        return
    for module in modules:
        module.to(device)
