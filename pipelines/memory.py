"""Memory modes: what to give up for less device memory, applied per request and undone after.

- `medvram`: diffusers' model CPU offload (each model moves to the device only while it runs);
- `lowvram`: sequential CPU offload (layer by layer: slowest, least memory);
- VAE tiling + slicing switch on by themselves for images past `vae_tile_above_pixels`
  (decoding a big image in tiles keeps the VAE's activations bounded; seams are blended);
- attention slicing fallback: a batch that runs out of memory is tried once more with sliced
  attention and VAE slicing (`sliced_for_retry`), which are taken off again after.
On a CPU device the offload modes change nothing (everything already lives in RAM) and say so
once in the log. Offload hooks and the VAE flags are removed after the request, so the cached
modules go back to how the manager keeps them.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

log = logging.getLogger("easel.memory")
MEMORY_MODES = ("normal", "medvram", "lowvram")


@dataclass(frozen=True)
class MemoryOptions:
    mode: str = "normal"
    vae_tile_above_pixels: int = 1536 * 1536  # 0: never tile

    def __post_init__(self) -> None:
        if self.mode not in MEMORY_MODES:
            raise ValueError(f"memory mode '{self.mode}' is not one of {', '.join(MEMORY_MODES)}")
        if self.vae_tile_above_pixels < 0:
            raise ValueError("vae_tile_above_pixels must be 0 (never) or a pixel count")


class MemoryPlan:
    """Applies MemoryOptions around one request on a per-request pipeline."""

    def __init__(self, options: MemoryOptions = MemoryOptions()) -> None:
        self.options = options
        self._said_noop = False

    @contextmanager
    def offload(self, pipe: Any, device: torch.device) -> Iterator[None]:
        mode = self.options.mode
        if mode == "normal":
            yield
            return
        if device.type != "cuda":
            if not self._said_noop:
                log.info("--%s: no effect on %s (the models already live in RAM)", mode, device.type)
                self._said_noop = True
            yield
            return
        if mode == "medvram":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        try:
            yield
        finally:
            pipe.remove_all_hooks()  # detaching the hooks puts offloaded weights back on the module
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    module.to(device)  # the manager keeps the active checkpoint on the device

    def wants_vae_tiling(self, width: int, height: int) -> bool:
        limit = self.options.vae_tile_above_pixels
        return bool(limit) and width * height > limit


def final_size(request) -> tuple[int, int]:
    """The largest image the request decodes: a hires pass's target (scale, or hr_resize_x/y)."""
    if not getattr(request, "enable_hr", False):
        return request.width, request.height
    from pipelines.hires import target_size

    width, height = target_size(request)
    return max(width, request.width), max(height, request.height)


@contextmanager
def vae_tiling(vae: Any, enabled: bool) -> Iterator[None]:
    """Tiled + sliced VAE encode/decode for this block; the VAE's own flags come back after."""
    if not enabled or not hasattr(vae, "enable_tiling"):
        yield
        return
    before = (getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False))
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        yield
    finally:
        vae.use_tiling, vae.use_slicing = before


@contextmanager
def sliced_for_retry(pipe: Any) -> Iterator[None]:
    """Sliced attention (`pipe.enable_attention_slicing()`) and VAE slicing for one retry after
    an out-of-memory error; every model's attention processors and the VAE's flag come back after."""
    from pipelines.prompts import composable

    composable.uninstall(pipe)  # an AND wrapper left by the failed try: slice the real UNet
    models = [m for m in pipe.components.values()
              if isinstance(m, torch.nn.Module) and hasattr(m, "set_attention_slice") and hasattr(m, "attn_processors")]
    processors = [(m, m.attn_processors) for m in models]
    vae = getattr(pipe, "vae", None)
    vae_slicing = getattr(vae, "use_slicing", None)
    pipe.enable_attention_slicing()
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    try:
        yield
    finally:
        for model, saved in processors:
            model.set_attn_processor(saved)
        if vae_slicing is not None:
            vae.use_slicing = vae_slicing
