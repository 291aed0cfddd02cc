"""Attach a request's control units to the active pipeline for one generation.

The ControlNets are loaded once into the manager's RAM cache (locked while in use) and joined
to the active pipeline with `from_pipe`, so the base model is never copied and the base
pipeline is left exactly as it was. All units go through one `UnitControlNets`, a
MultiControlNetModel that also applies each unit's control mode as the A1111 extension does:

- Balanced: the residuals times the weight.
- My prompt is more important ("soft injection"): the 13 residuals (12 down + mid in SD1)
  are scaled by weight * 0.825 ** (12 - i), so shallow layers are nearly off and the middle
  block keeps the full weight; with another number of residuals the same curve is used.
- ControlNet is more important ("soft injection" + "CFG injection"): the same scaling, and
  the control is added to the conditional half of the CFG batch only, so the unconditional
  prediction ignores it and CFG amplifies the control.

Weight and guidance start/end go through the diffusers pipeline's own per-net
`controlnet_conditioning_scale` / `control_guidance_start` / `control_guidance_end`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from pipelines import imageops
from pipelines.control import models, preprocessors
from pipelines.control.units import CONTROL_MODES, ControlUnit

SOFT_INJECTION_BASE = 0.825


def _diffusers_multi():
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    return MultiControlNetModel


def control_pipeline_class(sdxl: bool, task: str):
    import diffusers as d

    table = {
        (False, "txt2img"): d.StableDiffusionControlNetPipeline,
        (False, "img2img"): d.StableDiffusionControlNetImg2ImgPipeline,
        (False, "inpaint"): d.StableDiffusionControlNetInpaintPipeline,
        (True, "txt2img"): d.StableDiffusionXLControlNetPipeline,
        (True, "img2img"): d.StableDiffusionXLControlNetImg2ImgPipeline,
        (True, "inpaint"): d.StableDiffusionXLControlNetInpaintPipeline,
    }
    return table[(sdxl, task)]


def make_unit_controlnets(nets: Sequence[Any], control_modes: Sequence[str], cfg_batches: bool):
    """A MultiControlNetModel over shared nets with per-unit control modes (see module doc)."""
    base = _diffusers_multi()

    class UnitControlNets(base):
        def __init__(self) -> None:
            super().__init__(list(nets))
            self.control_modes = tuple(control_modes)
            self.cfg_batches = cfg_batches

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                    class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                    cross_attention_kwargs=None, guess_mode=False, return_dict=True):
            total_down, total_mid = None, None
            for image, scale, net, mode in zip(controlnet_cond, conditioning_scale, self.nets, self.control_modes):
                down, mid = net(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                controlnet_cond=image, conditioning_scale=scale, class_labels=class_labels,
                                timestep_cond=timestep_cond, attention_mask=attention_mask,
                                added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                                guess_mode=guess_mode, return_dict=False)
                down, mid = _apply_mode(list(down), mid, mode, self.cfg_batches and not guess_mode)
                if total_down is None:
                    total_down, total_mid = down, mid
                else:
                    total_down = [a + b for a, b in zip(total_down, down)]
                    total_mid = total_mid + mid
            return total_down, total_mid

    return UnitControlNets()


def _apply_mode(down: list[torch.Tensor], mid: torch.Tensor, mode: str, cfg_batches: bool):
    if mode == CONTROL_MODES[0]:
        return down, mid
    count = len(down)
    down = [d * SOFT_INJECTION_BASE ** float(count - i) for i, d in enumerate(down)]
    if mode == CONTROL_MODES[2] and cfg_batches:
        # The pipeline stacks [unconditional, conditional]: keep the control on the second half.
        keep = torch.ones(mid.shape[0], device=mid.device, dtype=mid.dtype)
        keep[: mid.shape[0] // 2] = 0
        down = [d * keep.view(-1, 1, 1, 1) for d in down]
        mid = mid * keep.view(-1, 1, 1, 1)
    return down, mid


# --- control images ---------------------------------------------------------------------------

def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: str) -> int:
    """The extension's pixel-perfect rule: the preprocessor runs at the size the map ends up at."""
    k_h, k_w = height / image.height, width / image.width
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    return max(64, int(round(k * min(image.width, image.height))))


def control_image(unit: ControlUnit, source: Image.Image, width: int, height: int, models_dir) -> Image.Image:
    """The preprocessed map at the generation size, resized with the unit's resize mode."""
    resolution = pixel_perfect_resolution(source, width, height, unit.resize_mode) if unit.pixel_perfect \
        else unit.processor_res
    detected = preprocessors.detect(unit.module, source, resolution=resolution, threshold_a=unit.threshold_a,
                                    threshold_b=unit.threshold_b, models_dir=models_dir)
    return imageops.resize_image(detected, width, height, unit.resize_mode.lower())


def unit_source(unit: ControlUnit, index: int, request) -> Image.Image:
    if unit.image is not None:
        return unit.image
    if request.init_image is not None:  # as the extension does: the img2img image stands in
        return request.init_image
    raise ValueError(f"ControlNet unit {index} has no input image: upload one (or use img2img, whose "
                     "image is used when the unit has none)")


# --- the one entry point for generate.py ------------------------------------------------------

def active_units(request) -> list[tuple[int, ControlUnit]]:
    return [(i, u) for i, u in enumerate(getattr(request, "control_units", ()) or ()) if u.active]


@contextmanager
def attach(manager, active, request) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yield (active pipeline with the ControlNets joined, extra pipeline call arguments).
    With no active unit: the active pipeline unchanged and no arguments."""
    units = active_units(request)
    if not units:
        yield active, {}
        return
    entries = []
    for index, unit in units:
        entry = manager.registry.find("controlnet", unit.model)
        models.check_compatible(entry, models.family_of_entry(entry), active.arch, active.checkpoint.name)
        entries.append(entry)
    # Preprocess before loading anything: a bad image or a missing annotator fails fast.
    models_dir = manager.registry.paths.models_dir
    images = [control_image(unit, unit_source(unit, index, request), request.width, request.height, models_dir)
              for index, unit in units]
    keys, nets = [], []
    try:
        for entry in entries:
            key = ("controlnet", str(entry.path), entry.mtime, entry.size)
            net = manager.cache.get_or_load(key, lambda entry=entry: _load_counted(manager, entry))
            manager.cache.lock(key)
            keys.append(key)
            models.check_compatible(entry, models.loaded_family(net), active.arch, active.checkpoint.name)
            if manager.device.type != "cpu":
                net.to(manager.device)
            nets.append(net)
        multi = make_unit_controlnets(nets, [u.control_mode for _, u in units], request.cfg_scale > 1)
        cls = control_pipeline_class(active.arch.is_sdxl, request.task)
        pipe = cls.from_pipe(active.pipe, controlnet=multi, torch_dtype=manager.dtype)
        image_key = "image" if request.task == "txt2img" else "control_image"
        kwargs = {image_key: images,
                  "controlnet_conditioning_scale": [float(u.weight) for _, u in units],
                  "control_guidance_start": [float(u.guidance_start) for _, u in units],
                  "control_guidance_end": [float(u.guidance_end) for _, u in units]}
        yield replace(active, pipe=pipe), kwargs
    finally:
        for key in keys:
            manager.cache.unlock(key)


def _load_counted(manager, entry):
    manager.load_counts["controlnet"] += 1
    return models.load_controlnet(entry, manager.dtype)


def infotext_params(manager, request) -> dict[str, str]:
    """`ControlNet N` entries for the units that took part, as the extension writes them."""
    params = {}
    for index, unit in active_units(request):
        title = unit.model
        try:
            entry = manager.registry.find("controlnet", unit.model)
            title = f"{entry.stem} [{manager.registry.sha256(entry)[:8]}]"
        except (ValueError, OSError):
            pass
        # The thresholds that ran, not the "-1 = default" placeholder.
        processor = preprocessors.get(unit.module)
        unit = unit.with_changes(threshold_a=processor.value_a(unit.threshold_a),
                                 threshold_b=processor.value_b(unit.threshold_b))
        params[f"ControlNet {index}"] = unit.infotext_value(title)
    return params
