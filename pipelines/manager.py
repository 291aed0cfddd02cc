"""PipelineManager: the one owner of device state.

It compares what a request needs (checkpoint, VAE, task) with what is loaded and changes only
the difference. Loaded checkpoints and VAEs live in a byte-budgeted RAM cache; the active ones
are moved to the device and locked while a request uses them. Task pipelines are thin wrappers
built per request over the shared modules (`from_pipe`), each with its own fresh scheduler, so
no request can leak state into the next.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from pipelines import loading
from pipelines.accelerators import Accelerators
from pipelines.adapters.lora_stack import AppliedLora, LoraRequest, LoraStack
from pipelines.arch import Arch
from pipelines.cache import ModelCache, module_bytes
from pipelines.loading import LoadedCheckpoint, ModelLoadError
from pipelines.memory import MemoryOptions, MemoryPlan
from pipelines.optimizations import FastMode, Optimizations
from pipelines.registry import ModelEntry, ModelRegistry
from pipelines.vae_family import check_vae_fits

AUTOMATIC_VAE = "Automatic"
NO_VAE = "None"


@dataclass
class ActivePipeline:
    """What a request runs on: a pipeline object of its own over shared, locked modules."""
    pipe: Any
    checkpoint: ModelEntry
    vae: ModelEntry | None  # None: the checkpoint's own VAE
    arch: Arch
    loras: list[AppliedLora] = field(default_factory=list)  # active this request


class PipelineManager:
    def __init__(self, registry: ModelRegistry, cache: ModelCache, device: torch.device,
                 dtype: torch.dtype, load_checkpoint: Callable[[ModelEntry, torch.dtype], LoadedCheckpoint] = loading.load_checkpoint,
                 load_vae: Callable[[ModelEntry, Arch, torch.dtype], Any] = loading.load_vae,
                 optimizations: Optimizations = Optimizations(), memory: MemoryOptions = MemoryOptions(),
                 lora_max_resident: int = 8, lora_fuse: bool = False) -> None:
        self.registry = registry
        self.cache = cache
        self.device = device
        self.dtype = dtype
        self._load_checkpoint = load_checkpoint
        self._load_vae = load_vae
        self._lock = threading.RLock()
        self._active_ckpt: LoadedCheckpoint | None = None
        self._active_vae: tuple[ModelEntry, Any] | None = None
        self.load_counts: Counter = Counter()  # loads from disk, by kind: the cache's effect
        # LoRAs stay resident in the loaded checkpoints; requests only select them.
        self.loras = LoraStack(registry, self.load_counts, max_resident=lora_max_resident, fuse=lora_fuse)
        self.fast = FastMode(optimizations)  # fast mode: applied on activation, undone on switch
        self.memory = MemoryPlan(memory)  # --medvram/--lowvram offload and automatic VAE tiling
        self.accelerators = Accelerators()  # DeepCache / ToMe per request, options in self.fast

    # --- what the UI / API ask -------------------------------------------------------------

    def resolve_checkpoint(self, name: str | None) -> ModelEntry:
        if not name:
            entry = self.registry.default_checkpoint()
            if entry is None:
                raise ValueError("No checkpoint found: put a .safetensors file in models/Stable-diffusion")
            return entry
        return self.registry.find("checkpoint", name)

    def resolve_vae(self, name: str | None, checkpoint: ModelEntry) -> ModelEntry | None:
        """None means the checkpoint's own VAE. "Automatic" prefers a `<stem>.vae.*` sidecar."""
        if not name or name == NO_VAE:
            return None
        if name == AUTOMATIC_VAE:
            sidecar = getattr(checkpoint, "sidecar_vae", None)
            if sidecar is None:
                return None
            return ModelEntry(kind="vae", name=sidecar.name, path=sidecar,
                              format="ckpt" if sidecar.suffix in (".pt", ".ckpt") else "safetensors",
                              arch=Arch.UNKNOWN, size=sidecar.stat().st_size, mtime=sidecar.stat().st_mtime,
                              metadata={}, builtin=False)
        return self.registry.find("vae", name)

    def snapshot(self) -> dict[str, Any]:
        # No lock: pipeline() holds it for a whole generation, and reading two references is
        # safe; a snapshot taken mid-swap is at worst one swap old.
        ckpt = self._active_ckpt
        vae = self._active_vae
        return {
            "checkpoint": ckpt.entry.label if ckpt else None,
            "arch": ckpt.arch.value if ckpt else None,
            "vae": vae[0].name if vae else AUTOMATIC_VAE,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "ram_cache": {"used_bytes": self.cache.current_bytes, "max_bytes": self.cache.max_bytes,
                          "entries": [list(k) for k in self.cache.keys()]},
            "loads": dict(self.load_counts),
            "loras_resident": self.loras.resident_names(ckpt.components["unet"]) if ckpt else [],
        }

    # --- the one way to get a pipeline ------------------------------------------------------

    @contextmanager
    def pipeline(self, task: str, checkpoint: str | None, vae: str | None = AUTOMATIC_VAE,
                 loras: tuple[LoraRequest, ...] = ()) -> Iterator[ActivePipeline]:
        with self._lock:
            ckpt_entry = self.resolve_checkpoint(checkpoint)
            vae_entry = self.resolve_vae(vae, ckpt_entry)
            loaded = self._activate_checkpoint(ckpt_entry)
            vae_module = self._activate_vae(vae_entry, loaded.arch)
            keys = [self._ckpt_key(ckpt_entry)] + ([self._vae_key(vae_entry, loaded.arch)] if vae_entry else [])
            for key in keys:
                self.cache.lock(key)
            try:
                components = dict(loaded.components)
                if vae_module is not None:
                    components["vae"] = vae_module
                self.fast.apply(components, with_loras=bool(loras))
                pipe = self._task_pipeline(loaded.arch, task, components)
                # Always called, also with no LoRAs: it switches off what the last request used.
                with self.loras.activate(pipe, loaded.arch, ckpt_entry.label, loras) as applied, \
                        self.memory.offload(pipe, self.device), \
                        self.accelerators.applied(pipe.unet, self.fast.options):
                    yield ActivePipeline(pipe=pipe, checkpoint=ckpt_entry, vae=vae_entry, arch=loaded.arch,
                                         loras=applied)
            finally:
                for key in keys:
                    self.cache.unlock(key)

    @contextmanager
    def device_lock(self) -> Iterator[None]:
        """Hold the device as a generation does (pipeline() holds this lock throughout), for
        device work outside the job queue, e.g. an Extras model upscale. Re-entrant."""
        with self._lock:
            yield

    def reactivate(self, active: ActivePipeline) -> None:
        """Put `active`'s checkpoint back on the device after a nested pipeline() for another
        checkpoint (a hires pass with its own model) moved it off; a cache hit, no load."""
        with self._lock:
            self._activate_checkpoint(active.checkpoint)

    def unload(self) -> None:
        """Move everything off the device (A1111 'unload checkpoint')."""
        with self._lock:
            if self._active_ckpt:
                self._move(self._active_ckpt.modules.values(), torch.device("cpu"))
            if self._active_vae:
                self._move([self._active_vae[1]], torch.device("cpu"))
            self._active_ckpt = None
            self._active_vae = None

    # --- the diff-then-apply steps --------------------------------------------------------

    @staticmethod
    def _ckpt_key(entry: ModelEntry) -> tuple:
        return ("checkpoint", str(entry.path), entry.mtime, entry.size)

    @staticmethod
    def _vae_key(entry: ModelEntry, arch: Arch) -> tuple:
        return ("vae", str(entry.path), entry.mtime, entry.size, arch.value)

    def _activate_checkpoint(self, entry: ModelEntry) -> LoadedCheckpoint:
        if self._active_ckpt and self._ckpt_key(self._active_ckpt.entry) == self._ckpt_key(entry) \
                and self._ckpt_key(entry) in self.cache:
            return self._active_ckpt

        def load() -> LoadedCheckpoint:
            self.load_counts["checkpoint"] += 1
            return self._load_checkpoint(entry, self.dtype)

        # Loading may fail (corrupt file, wrong kind): the active checkpoint stays as it was.
        loaded = self.cache.get_or_load(self._ckpt_key(entry), load, size_of=lambda c: module_bytes(c.modules))
        if self._active_ckpt is not None:
            self.fast.restore(self._active_ckpt.components)  # the cached copy goes back as loaded
            self._move(self._active_ckpt.modules.values(), torch.device("cpu"))
        self._move(loaded.modules.values(), self.device)
        self._active_ckpt = loaded
        return loaded

    def _activate_vae(self, entry: ModelEntry | None, arch: Arch):
        if entry is None:
            if self._active_vae is not None:
                self._move([self._active_vae[1]], torch.device("cpu"))
                self._active_vae = None
            return None
        # A real SDXL VAE has SD1's shapes and would load: refuse it when its file says what it is.
        check_vae_fits(entry, arch, self._active_ckpt.entry.name if self._active_ckpt is not None else None)
        key = self._vae_key(entry, arch)

        def load():
            self.load_counts["vae"] += 1
            vae = self._load_vae(entry, arch, self.dtype)
            vae.register_to_config(scaling_factor=self._active_ckpt.components["vae"].config.scaling_factor)
            return vae

        vae = self.cache.get_or_load(key, load)
        if self._active_vae is not None and self._active_vae[1] is not vae:
            self._move([self._active_vae[1]], torch.device("cpu"))
        self._move([vae], self.device)
        self._active_vae = (entry, vae)
        return vae

    def _move(self, modules, device: torch.device) -> None:
        if self.device.type == "cpu":
            return  # everything already lives in RAM
        for module in modules:
            module.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _task_pipeline(self, arch: Arch, task: str, components: dict[str, Any]):
        # A base txt2img pipeline over the shared modules, then `from_pipe` for the task: no
        # weights are copied, and each request gets a pipeline object (and scheduler) of its own.
        base_cls = loading.pipeline_class(arch, "txt2img")
        expected = set(base_cls._get_signature_keys(base_cls)[0])
        kwargs = {k: components.get(k) for k in expected}
        if not arch.is_sdxl:
            kwargs["requires_safety_checker"] = False
        base = base_cls(**kwargs)
        # from_pipe casts to torch_dtype (float32 when not given): pass ours so nothing converts.
        return loading.pipeline_class(arch, task).from_pipe(base, torch_dtype=self.dtype)
