"""Fast mode: speed-ups applied to a loaded checkpoint's modules, each undone exactly.

Applied by the PipelineManager when a checkpoint becomes active and undone when it is switched
away (ComfyUI's patch-with-backup idea: the cached modules go back to what the loader made).
- channels_last: UNet/VAE conv weights in NHWC (faster convolutions on GPUs, same numbers);
- fused QKV: one matmul for q/k/v (k/v for cross-attention). Not while LoRA layers are injected
  in the UNet: a fused projection would bypass their deltas, so requests with LoRAs unfuse;
- torch.compile, regional: the UNet's repeated transformer blocks only (short compiles). Each
  new input shape compiles once; torch keeps the graphs, so later requests of that shape reuse
  them. `compile_pending(shape)` tells the caller a compile is about to happen (for progress).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("easel.optimizations")


@dataclass(frozen=True)
class Optimizations:
    fast: bool = False  # channels_last + fused QKV
    compile: bool = False  # regional torch.compile of the UNet (needs fast)


def _has_lora_layers(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _attention_modules(module: torch.nn.Module):
    from diffusers.models.attention_processor import Attention
    return [m for m in module.modules() if isinstance(m, Attention)]


@dataclass
class _Applied:
    channels_last: list[torch.nn.Module] = field(default_factory=list)
    fused: list[torch.nn.Module] = field(default_factory=list)
    compiled: list[torch.nn.Module] = field(default_factory=list)


class FastMode:
    """Tracks what it changed on which modules (by identity) so `restore` undoes only that."""

    def __init__(self, options: Optimizations) -> None:
        self.options = options
        self._applied: dict[int, _Applied] = {}  # id(unet) -> changes on that checkpoint
        self._compiled_shapes: set[tuple] = set()

    @property
    def enabled(self) -> bool:
        return self.options.fast or self.options.compile

    def apply(self, components: dict[str, Any], with_loras: bool = False) -> None:
        """Make the checkpoint's modules fast; idempotent. `with_loras`: this request uses LoRAs."""
        unet, vae = components.get("unet"), components.get("vae")
        if not self.enabled or unet is None:
            return
        state = self._applied.setdefault(id(unet), _Applied())
        for module in (unet, vae):
            if module is not None and module not in state.channels_last:
                module.to(memory_format=torch.channels_last)
                state.channels_last.append(module)
        lora_layers = with_loras or _has_lora_layers(unet)
        if lora_layers and unet in state.fused:
            self._unfuse(unet, state)
        elif not lora_layers and unet not in state.fused and hasattr(unet, "fuse_qkv_projections"):
            unet.fuse_qkv_projections()
            state.fused.append(unet)
        if self.options.compile and unet not in state.compiled:
            log.info("fast mode: compiling the UNet's repeated blocks (once per image shape)")
            unet.compile_repeated_blocks(fullgraph=False, dynamic=False)
            state.compiled.append(unet)

    def restore(self, components: dict[str, Any]) -> None:
        """Undo everything `apply` did on these modules (a checkpoint switch, fast mode off)."""
        unet = components.get("unet")
        state = self._applied.pop(id(unet), None) if unet is not None else None
        if state is None:
            return
        for module in state.compiled:
            for sub in module.modules():
                if getattr(sub, "_compiled_call_impl", None) is not None:
                    sub._compiled_call_impl = None
        if unet in state.fused:
            self._unfuse(unet, state)
        for module in state.channels_last:
            module.to(memory_format=torch.contiguous_format)

    def compile_pending(self, shape: tuple) -> bool:
        """True the first time a shape is seen with compile on: this request pays the compile."""
        if not self.options.compile or shape in self._compiled_shapes:
            return False
        self._compiled_shapes.add(shape)
        return True

    @staticmethod
    def _unfuse(unet: torch.nn.Module, state: _Applied) -> None:
        unet.unfuse_qkv_projections()
        for attention in _attention_modules(unet):  # drop the fused copies: memory back as loaded
            for name in ("to_qkv", "to_kv", "to_added_qkv"):
                if hasattr(attention, name):
                    delattr(attention, name)
            attention.fused_projections = False
        state.fused.remove(unet)


def memory_format_of(module: torch.nn.Module) -> torch.memory_format:
    """channels_last if the module's 4-D conv weights are NHWC (for tests and the status line)."""
    for p in module.parameters():
        if p.dim() == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) \
                and not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format
