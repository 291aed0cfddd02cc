"""Fast mode: speed-ups applied to a loaded checkpoint's modules, each undone exactly.

Applied by the PipelineManager when a checkpoint becomes active and undone when it is switched
away (ComfyUI's patch-with-backup idea: the cached modules go back to what the loader made).
- channels_last: UNet/VAE conv weights in NHWC (faster convolutions on GPUs, same numbers);
- fused QKV: one matmul for q/k/v (k/v for cross-attention). Not while LoRA layers are injected
  in the UNet: a fused projection would bypass their deltas, so requests with LoRAs unfuse;
- torch.compile: regional (the UNet's repeated transformer blocks only, short compiles), or the
  whole UNet with `compile_mode="reduce-overhead"` (CUDA graphs: they pay when one graph covers
  the whole step; CUDA only, other devices fall back to the default mode). Each new input shape
  compiles once; torch keeps the graphs, so later requests of that shape reuse them.
  `compile_pending(shape)` tells the caller a compile is about to happen (for progress); the
  record is cleared whenever the compiled modules change (restore, QKV fuse/unfuse), so a
  recompile is reported too. `compile_backend` "eager"/"aot_eager" let CPU tests run Dynamo
  without code generation.
- LoRA hot-swap: with compile on and `lora_hotswap_rank` > 0, `enable_lora_hotswap(target_rank)`
  is called before compiling, so the first LoRA loaded is padded to that rank with tensor scales
  and a later LoRA swapped into the same adapter (`load_lora_weights(..., hotswap=True)`) does not
  recompile. The UNet then stays unfused (fusing/unfusing between LoRA and plain requests would
  recompile every time).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("easel.optimizations")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


@dataclass(frozen=True)
class Optimizations:
    fast: bool = False  # channels_last + fused QKV
    compile: bool = False  # torch.compile of the UNet (needs fast)
    compile_mode: str = "default"  # "reduce-overhead": CUDA graphs, whole UNet
    compile_backend: str = "inductor"  # "eager" / "aot_eager": Dynamo only (CPU tests)
    lora_hotswap_rank: int = 0  # > 0 with compile: enable_lora_hotswap(target_rank) before compiling
    deepcache_interval: int = 0  # > 1: DeepCache, full UNet every N steps (pipelines/accelerators.py)
    tomesd_ratio: float = 0.0  # > 0: token merging in self-attention (pipelines/accelerators.py)

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode '{self.compile_mode}' is not one of {', '.join(COMPILE_MODES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile backend '{self.compile_backend}' is not one of {', '.join(COMPILE_BACKENDS)}")
        if self.lora_hotswap_rank < 0:
            raise ValueError("lora_hotswap_rank must be 0 (off) or the largest LoRA rank to expect")
        if self.deepcache_interval < 0 or self.deepcache_interval == 1:
            raise ValueError("deepcache interval must be 0 (off) or at least 2 (full UNet every N steps)")
        if not 0 <= self.tomesd_ratio <= 0.75:
            raise ValueError("tomesd ratio must be between 0 (off) and 0.75 (share of tokens merged)")

    @property
    def accelerated(self) -> bool:
        return self.deepcache_interval > 1 or self.tomesd_ratio > 0

    @classmethod
    def from_settings(cls, settings) -> "Optimizations":
        """--fast, --fast-compile (+ mode, backend, LoRA hot-swap rank), --deepcache, --tomesd."""
        compile_ = bool(settings.fast_compile)
        return cls(fast=bool(settings.fast) or compile_, compile=compile_,
                   compile_mode=settings.fast_compile_mode, compile_backend=settings.fast_compile_backend,
                   lora_hotswap_rank=settings.fast_lora_rank if compile_ else 0,
                   deepcache_interval=settings.deepcache, tomesd_ratio=settings.tomesd)


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

    @property
    def hotswap(self) -> bool:
        return self.options.compile and self.options.lora_hotswap_rank > 0

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
        elif not lora_layers and not self.hotswap and unet not in state.fused \
                and hasattr(unet, "fuse_qkv_projections"):
            unet.fuse_qkv_projections()
            state.fused.append(unet)
            self._compiled_shapes.clear()  # compiled code for the unfused modules no longer applies
        if self.options.compile and unet not in state.compiled:
            self._compile(unet)
            state.compiled.append(unet)

    def _compile(self, unet: torch.nn.Module) -> None:
        options = self.options
        mode = options.compile_mode
        if mode == "reduce-overhead" and unet.device.type != "cuda":
            log.info("fast mode: CUDA graphs need a CUDA device; compiling in the default mode on %s",
                     unet.device.type)
            mode = "default"
        if self.hotswap:
            if getattr(unet, "peft_config", None):
                log.warning("fast mode: LoRAs were loaded before compiling; LoRA switches may recompile")
            unet.enable_lora_hotswap(target_rank=options.lora_hotswap_rank, check_compiled="ignore")
        kwargs: dict[str, Any] = {"backend": options.compile_backend, "dynamic": False, "fullgraph": False}
        if options.compile_backend == "inductor" and mode != "default":
            kwargs["mode"] = mode  # modes are options of inductor only
        if mode == "reduce-overhead":
            log.info("fast mode: compiling the whole UNet with CUDA graphs (once per image shape)")
            unet.compile(**kwargs)
        else:
            log.info("fast mode: compiling the UNet's repeated blocks (once per image shape)")
            unet.compile_repeated_blocks(**kwargs)

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
            module.__dict__.pop("_prepare_lora_hotswap_kwargs", None)  # unused if no LoRA came since
        if state.compiled:
            self._compiled_shapes.clear()  # the next activation compiles again
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

    def _unfuse(self, unet: torch.nn.Module, state: _Applied) -> None:
        unet.unfuse_qkv_projections()
        for attention in _attention_modules(unet):  # drop the fused copies: memory back as loaded
            for name in ("to_qkv", "to_kv", "to_added_qkv"):
                if hasattr(attention, name):
                    delattr(attention, name)
            attention.fused_projections = False
        state.fused.remove(unet)
        self._compiled_shapes.clear()  # other modules under the compiled blocks: they recompile


def memory_format_of(module: torch.nn.Module) -> torch.memory_format:
    """channels_last if the module's 4-D conv weights are NHWC (for tests and the status line)."""
    for p in module.parameters():
        if p.dim() == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) \
                and not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format
