"""Attach a request's control units to the active pipeline for one generation.

The ControlNets are loaded once into the manager's RAM cache (locked while in use) and joined
to the active pipeline with `from_pipe`, so the base model is never copied and the base
pipeline is left exactly as it was. All units go through one `UnitControlNets`, a
MultiControlNetModel that also applies each unit's control mode as the A1111 extension does:

- Balanced: the residuals times the weight.
- My prompt is more important ("soft injection"): the 13 residuals (12 down + mid in SD1)
  are scaled by weight * 0.825 ** (12 - i), so shallow layers are nearly off and the middle
  block keeps the full weight. SDXL's 10 (9 down + mid) take the first 10 of those 13 factors,
  as the extension's `control_scales[:10]` does; T2I-Adapter features take its fixed
  (0.25, 0.62, 0.825, 1.0).
- ControlNet is more important ("soft injection" + "CFG injection"): the same scaling, and
  the control is added to the conditional half of the CFG batch only, so the unconditional
  prediction ignores it and CFG amplifies the control.

Weight and guidance start/end go through the diffusers pipeline's own per-net
`controlnet_conditioning_scale` / `control_guidance_start` / `control_guidance_end`.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from pipelines import imageops
from pipelines.control import gligen, ip_adapter, models, preprocessors, t2i_adapter
from pipelines.control.units import CONTROL_MODES, UNIT_TYPE_KINDS, ControlUnit

SOFT_INJECTION_BASE = 0.825
T2I_SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)  # the extension's, per adapter level


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
                if not hasattr(net, "controlnet_cond_embedding"):  # a T2I-Adapter: intrablock features, no mid
                    down = t2i_adapter.adapter_features(net, image, scale)
                    down, _ = _apply_mode(down, down[-1], mode, self.cfg_batches and not guess_mode, adapter=True)
                    total_down = down if total_down is None else [a + b for a, b in zip(total_down, down)]
                    continue
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


def soft_injection_scales(count: int, adapter: bool = False) -> list[float]:
    """The extension's per-residual factors, deepest last: `count` down residuals and the mid
    one for a ControlNet, `count` features for a T2I-Adapter."""
    if adapter:
        return list(T2I_SOFT_SCALES[:count]) + [1.0] * (count - len(T2I_SOFT_SCALES))  # never drop a level
    return [SOFT_INJECTION_BASE ** float(12 - i) for i in range(count + 1)]


def _apply_mode(down: list[torch.Tensor], mid: torch.Tensor, mode: str, cfg_batches: bool, adapter: bool = False):
    if mode == CONTROL_MODES[0]:
        return down, mid
    scales = soft_injection_scales(len(down), adapter)
    down = [d * s for d, s in zip(down, scales)]
    if not adapter:
        mid = mid * scales[-1]
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


def control_image(unit: ControlUnit, source: Image.Image, width: int, height: int, models_dir,
                  table: preprocessors.PreprocessorTable | None = None) -> Image.Image:
    """The preprocessed map at the generation size, resized with the unit's resize mode
    (`table`: the extensions' preprocessors, from `request.additions`)."""
    resolution = pixel_perfect_resolution(source, width, height, unit.resize_mode) if unit.pixel_perfect \
        else unit.processor_res
    detected = preprocessors.detect(unit.module, source, resolution=resolution, threshold_a=unit.threshold_a,
                                    threshold_b=unit.threshold_b, models_dir=models_dir, table=table)
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


@dataclass(frozen=True)
class _Resolved:
    index: int
    unit: ControlUnit
    entry: Any
    kind: str  # "controlnet" | "t2i_adapter" | "ip_adapter"


def resolve_entry(registry, name: str):
    """A models/ControlNet entry, else an IP-Adapter in models/ipadapter."""
    try:
        return registry.find("controlnet", name)
    except ValueError:
        entry = ip_adapter.ip_adapter_entry(registry.paths.models_dir, name, registry.cached_sha256)
        if entry is None:
            raise
        return entry


def _resolve(manager, active, request) -> list[_Resolved]:
    resolved = []
    for index, unit in active_units(request):
        entry = resolve_entry(manager.registry, unit.model)
        kind = models.model_kind(entry)
        if kind == "image_encoder":
            raise ValueError(f"{entry.name} is a CLIP image encoder, used by IP-Adapters by itself; "
                             "pick a ControlNet or an IP-Adapter as the unit's model")
        wanted = UNIT_TYPE_KINDS.get(unit.unit_type)
        if wanted is not None and kind != wanted:
            found = next(t for t, k in UNIT_TYPE_KINDS.items() if k == kind)
            raise ValueError(f"ControlNet unit {index}: {entry.name} is a {found} model, but the unit's "
                             f"type is {unit.unit_type}; pick a {unit.unit_type} model or type All")
        models.check_compatible(entry, models.family_of_entry(entry), active.arch, active.checkpoint.name)
        full_range = (unit.guidance_start, unit.guidance_end, unit.control_mode) == (0, 1, CONTROL_MODES[0])
        if kind == "ip_adapter" and not full_range:
            raise ValueError(f"ControlNet unit {index} ({entry.name}): IP-Adapter units run over all steps in "
                             "Balanced mode; set starting step 0, ending step 1 and control mode Balanced")
        resolved.append(_Resolved(index, unit, entry, kind))
    kinds = {r.kind for r in resolved}
    if {"controlnet", "t2i_adapter"} <= kinds:
        raise ValueError("ControlNet and T2I-Adapter units cannot run in the same generation; "
                         "disable the units of one kind")
    return resolved


def _cached(manager, keys: list, key: tuple, load, size_of=None):
    value = manager.cache.get_or_load(key, load, **({"size_of": size_of} if size_of else {}))
    manager.cache.lock(key)
    keys.append(key)
    return value


def _state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for part in state.values() for t in part.values())


@contextmanager
def attach(manager, active, request) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yield (active pipeline with the units' models joined, extra pipeline call arguments).
    With no active unit: the active pipeline unchanged and no arguments."""
    resolved = _resolve(manager, active, request)
    models_dir = manager.registry.paths.models_dir
    gligen_path = _gligen_path(models_dir, request, resolved)
    if not resolved and gligen_path is None:
        yield active, {}
        return
    controlnets = [r for r in resolved if r.kind in ("controlnet", "t2i_adapter")]
    adapters = [r for r in resolved if r.kind == "ip_adapter"]
    # Preprocess before loading anything: a bad image or a missing annotator fails fast.
    images = [control_image(r.unit, unit_source(r.unit, r.index, request), request.width, request.height, models_dir,
                            request.additions.preprocessors)
              for r in controlnets]
    prompts = [unit_source(r.unit, r.index, request).convert("RGB") for r in adapters]
    encoder_dir = ip_adapter.find_image_encoder(models_dir, adapters[0].entry.path) if adapters else None
    keys: list = []
    try:
        overrides: dict[str, Any] = {}
        states = []
        if adapters:
            encoder = _cached(manager, keys, ("image_encoder", str(encoder_dir)),
                              lambda: ip_adapter.load_image_encoder(encoder_dir, manager.dtype))
            overrides = dict(image_encoder=_on_device(manager, encoder),
                             feature_extractor=ip_adapter.feature_extractor_for(encoder))
            states = [_cached(manager, keys, ("ip_adapter", str(r.entry.path), r.entry.mtime, r.entry.size),
                              lambda r=r: ip_adapter.read_ip_adapter(r.entry), size_of=_state_bytes)
                      for r in adapters]
        kwargs: dict[str, Any] = {}
        if controlnets:
            nets = []
            for r in controlnets:
                if r.kind == "t2i_adapter":  # its config depends on the checkpoint it joins
                    key = ("t2i_adapter", str(r.entry.path), r.entry.mtime, r.entry.size, active.arch.value)
                    net = _cached(manager, keys, key, lambda entry=r.entry: t2i_adapter.load_t2i_adapter(
                        entry, active.pipe.unet.config, active.arch.is_sdxl, t2i_adapter.vae_factor_of(active.pipe),
                        manager.dtype))
                else:
                    key = ("controlnet", str(r.entry.path), r.entry.mtime, r.entry.size)
                    net = _cached(manager, keys, key, lambda entry=r.entry: _load_counted(manager, entry))
                    models.check_fits_unet(r.entry, net, active.pipe.unet, active.checkpoint.name)
                nets.append(_on_device(manager, net))
            multi = make_unit_controlnets(nets, [r.unit.control_mode for r in controlnets], request.cfg_scale > 1)
            cls = control_pipeline_class(active.arch.is_sdxl, request.task)
            pipe = cls.from_pipe(active.pipe, controlnet=multi, torch_dtype=manager.dtype, **overrides)
            kwargs = {"image" if request.task == "txt2img" else "control_image": images,
                      "controlnet_conditioning_scale": [float(r.unit.weight) for r in controlnets],
                      "control_guidance_start": [float(r.unit.guidance_start) for r in controlnets],
                      "control_guidance_end": [float(r.unit.guidance_end) for r in controlnets]}
        else:
            pipe = type(active.pipe).from_pipe(active.pipe, torch_dtype=manager.dtype, **overrides)
        with ExitStack() as stack:
            if adapters:
                stack.enter_context(ip_adapter.loaded_into(pipe, states, [float(r.unit.weight) for r in adapters]))
                kwargs["ip_adapter_image"] = prompts
            if gligen_path is not None:
                state = _cached(manager, keys, ("gligen", str(gligen_path), gligen_path.stat().st_mtime),
                                lambda: gligen.read_gligen(gligen_path),
                                size_of=lambda sd: sum(t.numel() * t.element_size() for t in sd.values()))
                stack.enter_context(gligen.grafted(pipe.unet, state, manager.dtype))
                kwargs["cross_attention_kwargs"] = gligen.cross_attention_kwargs(
                    pipe, request.gligen_boxes, request.batch_size, request.cfg_scale > 1)
            yield replace(active, pipe=pipe), kwargs
    finally:
        for key in keys:
            manager.cache.unlock(key)


def _gligen_path(models_dir, request, resolved):
    boxes, model = getattr(request, "gligen_boxes", ()), getattr(request, "gligen_model", "")
    if not boxes:
        return None
    if not model:
        raise ValueError("GLIGEN boxes need a GLIGEN model: pick one from models/gligen")
    if any(r.kind in ("controlnet", "t2i_adapter") for r in resolved):
        raise ValueError("GLIGEN cannot run together with ControlNet or T2I-Adapter units; disable one of them")
    return gligen.find_gligen(models_dir, model)


def _on_device(manager, module):
    if manager.device.type != "cpu":
        module.to(manager.device)
    return module


def _load_counted(manager, entry):
    manager.load_counts["controlnet"] += 1
    return models.load_controlnet(entry, manager.dtype)


def infotext_params(manager, request) -> dict[str, str]:
    """`ControlNet N` entries for the units that took part, as the extension writes them."""
    params = {}
    for index, unit in active_units(request):
        title = unit.model
        try:
            entry = resolve_entry(manager.registry, unit.model)
            title = f"{entry.stem} [{manager.registry.sha256(entry)[:8]}]"
        except (ValueError, OSError):
            pass
        # The thresholds that ran, not the "-1 = default" placeholder.
        processor = preprocessors.get(unit.module, request.additions.preprocessors)
        unit = unit.with_changes(threshold_a=processor.value_a(unit.threshold_a),
                                 threshold_b=processor.value_b(unit.threshold_b))
        params[f"ControlNet {index}"] = unit.infotext_value(title)
    if getattr(request, "gligen_boxes", ()) and request.gligen_model:
        params["GLIGEN"] = Path(request.gligen_model).stem
        params["GLIGEN boxes"] = "; ".join(f"{p} {x0:g} {y0:g} {x1:g} {y1:g}" for p, x0, y0, x1, y1
                                           in request.gligen_boxes)
    return params
