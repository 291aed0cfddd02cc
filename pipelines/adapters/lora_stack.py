"""The LoRA adapter stack of the loaded checkpoints: diff-then-apply, never a reload.

A LoRA is loaded once into the checkpoint's UNet / text encoders with diffusers'
`load_lora_weights(adapter_name=...)` and stays resident; each request only selects adapters and
weights (`set_adapters`, separately for the text encoders and the UNet). At most `max_resident`
stay loaded per checkpoint; the least recently used one is deleted (`delete_adapters`) to make
room. A component whose adapters all have weight 0 has its LoRA layers switched off entirely,
so its output is bit-for-bit the base model's (no "multiply by 0" path with other rounding).

Optional fusing merges the selected adapters into the weights for one request and restores the
original weights from a CPU backup afterwards (patch with backup): unfusing by subtraction alone
would leave rounding residue in the base weights.
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipelines.adapters import lora_files, lycoris
from pipelines.arch import Arch
from pipelines.registry import ModelEntry, ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraRequest:
    """One `<lora:name:te:unet>` wish: a name the registry resolves and two multipliers."""
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass(frozen=True)
class AppliedLora:
    entry: ModelEntry
    te_weight: float
    unet_weight: float
    adapter: str  # the PEFT adapter name inside the model
    report: str = ""  # what did not fit when it was loaded (partly matching keys), for the user


def requests_of(applied: list[AppliedLora]) -> tuple[LoraRequest, ...]:
    """The requests that select `applied` again (e.g. for a second pass that re-enters the manager)."""
    return tuple(LoraRequest(a.entry.name, a.te_weight, a.unet_weight) for a in applied)


@dataclass
class _CheckpointLoras:
    """What is resident in one loaded checkpoint's modules, least recently used first."""
    resident: "OrderedDict[tuple, str]" = field(default_factory=OrderedDict)  # file key -> adapter
    reports: dict[str, str] = field(default_factory=dict)  # adapter -> partial-match report
    # What the last request selected (adapter, te, unet weights) and the resulting per-component
    # selection; None after any load or delete. The same wish again changes nothing.
    selected: tuple | None = None
    selection: dict[str, list[str]] = field(default_factory=dict)


class LoraStack:
    def __init__(self, registry: ModelRegistry, load_counts: Counter, max_resident: int = 8,
                 fuse: bool = False,
                 read_state_dict: Callable[[Any], dict[str, torch.Tensor]] = lora_files.read_lora_state_dict) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.registry = registry
        self.load_counts = load_counts
        self.max_resident = max_resident
        self.fuse = fuse
        self._read = read_state_dict
        # Keyed by the UNet module: when the checkpoint leaves the cache, its record goes too.
        self._states: "weakref.WeakKeyDictionary[torch.nn.Module, _CheckpointLoras]" = weakref.WeakKeyDictionary()

    # --- queries ------------------------------------------------------------------------------

    def resident(self, unet: torch.nn.Module) -> list[str]:
        """Adapter names resident in a checkpoint, least recently used first."""
        state = self._states.get(unet)
        return list(state.resident.values()) if state else []

    def resident_names(self, unet: torch.nn.Module) -> list[str]:
        """File names of the LoRAs resident in a checkpoint, least recently used first."""
        state = self._states.get(unet)
        return [Path(key[0]).name for key in state.resident] if state else []

    def reports(self, unet: torch.nn.Module) -> dict[str, str]:
        state = self._states.get(unet)
        return dict(state.reports) if state else {}

    # --- the per-request step -----------------------------------------------------------------

    @contextmanager
    def activate(self, pipe, arch: Arch, checkpoint_name: str,
                 requests: tuple[LoraRequest, ...] | list[LoraRequest]) -> Iterator[list[AppliedLora]]:
        """Make exactly `requests` active on `pipe` for the duration of the block."""
        state = self._states.setdefault(pipe.unet, _CheckpointLoras())
        wanted = self._resolve(requests, arch, checkpoint_name)
        keep = {_file_key(entry) for entry, _ in wanted}
        applied = []
        for entry, request in wanted:
            adapter = self._ensure_resident(pipe, state, entry, arch, checkpoint_name, keep)
            applied.append(AppliedLora(entry, request.te_weight, request.unet_weight, adapter,
                                       state.reports.get(adapter, "")))
        wish = tuple((a.adapter, a.te_weight, a.unet_weight) for a in applied)
        if not state.resident:
            selection = {}  # nothing was ever loaded into this checkpoint: nothing to switch off
        elif wish == state.selected:
            selection = state.selection  # diff-then-apply: already selected
        else:
            state.selected = None  # a failure half-way must not look like a finished selection
            selection = self._select(pipe, applied)
            state.selected, state.selection = wish, selection
        if self.fuse and any(selection.values()):
            with _fused(pipe, selection):
                yield applied
        else:
            yield applied

    def _resolve(self, requests, arch: Arch, checkpoint_name: str) -> list[tuple[ModelEntry, LoraRequest]]:
        merged: dict[tuple, tuple[ModelEntry, LoraRequest]] = {}
        for request in requests:
            entry = self.registry.find("lora", request.name)
            lora_files.check_fits(entry.name, entry.arch, checkpoint_name, arch)
            key = _file_key(entry)
            if key in merged:  # the same LoRA twice adds up, as two A1111 networks would
                old = merged[key][1]
                request = LoraRequest(request.name, old.te_weight + request.te_weight,
                                      old.unet_weight + request.unet_weight)
            merged[key] = (entry, request)
        # A stable order (by file) so "a then b" and "b then a" select the same stack.
        return [merged[k] for k in sorted(merged)]

    def _ensure_resident(self, pipe, state: _CheckpointLoras, entry: ModelEntry, arch: Arch,
                         checkpoint_name: str, keep: set[tuple]) -> str:
        key = _file_key(entry)
        if key in state.resident:
            state.resident.move_to_end(key)
            return state.resident[key]
        self._make_room(pipe, state, keep)
        state_dict = self._read(entry.path)
        lora_files.check_supported_format(entry.name, state_dict)
        expected = lora_files.lora_module_count(state_dict)
        if lycoris.is_lycoris(state_dict):  # LoHa / LoKr: the same update as plain LoRA factors
            try:
                # modules without a layer of that name are left out: counted as not matching below
                state_dict, _ = lycoris.to_lora(
                    state_dict, lycoris.layer_shapes(pipe, lycoris.lycoris_modules(state_dict)))
            except ValueError as exc:
                raise ValueError(f"LoRA {entry.name}: {exc}") from exc
        adapter = "lora_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        self.load_counts["lora"] += 1
        state.selected = None  # a load, even a failed one, may change which adapters are active
        try:
            if not lora_files.lora_module_count(state_dict):
                raise ValueError("no layer of it has a name this checkpoint has")
            pipe.load_lora_weights(state_dict, adapter_name=adapter)
        except Exception as exc:
            _discard(pipe, adapter)
            raise ValueError(
                f"LoRA {entry.name} ({_base(entry)}) does not fit the {lora_files.family(arch)} checkpoint "
                f"{checkpoint_name}: {_load_problem(exc)}") from exc
        matched = _count_layers(pipe, adapter)
        if matched == 0:
            _discard(pipe, adapter)
            raise ValueError(
                f"None of the {expected} layers of LoRA {entry.name} ({_base(entry)}) match the "
                f"{lora_files.family(arch)} checkpoint {checkpoint_name}; it was made for another model.")
        if expected and matched < expected:
            report = (f"LoRA {entry.name}: only {matched} of {expected} layers match {checkpoint_name}; "
                      "the others are not applied")
            log.warning(report)
            state.reports[adapter] = report
        state.resident[key] = adapter
        state.selected = None  # diffusers activates what it loads: select again
        return adapter

    def _make_room(self, pipe, state: _CheckpointLoras, keep: set[tuple]) -> None:
        while len(state.resident) >= self.max_resident:
            victim = next((k for k in state.resident if k not in keep), None)
            if victim is None:
                return  # everything resident is wanted now: go over the cap for this request
            adapter = state.resident.pop(victim)
            state.reports.pop(adapter, None)
            state.selected = None
            pipe.delete_adapters(adapter)

    @staticmethod
    def _select(pipe, applied: list[AppliedLora]) -> dict[str, list[str]]:
        """Activate the adapters with a non-zero weight per component; switch the LoRA layers
        of a component off entirely when none has. Returns component -> active adapters."""
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )
        from diffusers.models.modeling_utils import ModelMixin

        selection: dict[str, list[str]] = {}
        for component in pipe._lora_loadable_modules:
            model = getattr(pipe, component, None)
            if model is None:
                continue
            present = _adapters_in(model)
            if not present:
                continue
            is_text = component.startswith("text_encoder")
            chosen = [(a.adapter, a.te_weight if is_text else a.unet_weight) for a in applied
                      if a.adapter in present]
            chosen = [(name, weight) for name, weight in chosen if weight != 0]
            names, weights = [n for n, _ in chosen], [w for _, w in chosen]
            selection[component] = names
            if isinstance(model, ModelMixin):
                if names:
                    model.enable_lora()
                    model.set_adapters(names, weights)
                else:
                    model.disable_lora()
            elif names:
                enable_lora_for_text_encoder(model)
                set_adapters_for_text_encoder(names, model, weights)
            else:
                disable_lora_for_text_encoder(model)
        return selection


# --- fusing with a backup ----------------------------------------------------------------------

@contextmanager
def _fused(pipe, selection: dict[str, list[str]]) -> Iterator[None]:
    backups: list[tuple[Any, torch.Tensor]] = []
    merged: list[Any] = []
    try:
        for component, names in selection.items():
            if not names:
                continue
            for layer in _tuner_layers(getattr(pipe, component)):
                present = [n for n in names if n in layer.lora_A]
                if not present:
                    continue
                weight = layer.get_base_layer().weight
                backups.append((weight, weight.detach().to("cpu", copy=True)))
                layer.merge(adapter_names=present)
                merged.append(layer)
        yield
    finally:
        for layer in merged:
            layer.unmerge()
        with torch.no_grad():
            for weight, saved in backups:
                weight.copy_(saved)  # exact original bits, whatever the subtraction left


# --- helpers ---------------------------------------------------------------------------------------

def _file_key(entry: ModelEntry) -> tuple:
    return (str(entry.path), entry.mtime, entry.size)


def _tuner_layers(model) -> Iterator[Any]:
    from peft.tuners.lora import LoraLayer

    return (m for m in model.modules() if isinstance(m, LoraLayer))


def _adapters_in(model) -> set[str]:
    names: set[str] = set()
    for layer in _tuner_layers(model):
        names.update(layer.lora_A.keys())
    return names


def _count_layers(pipe, adapter: str) -> int:
    total = 0
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if model is not None:
            total += sum(1 for layer in _tuner_layers(model) if adapter in layer.lora_A)
    return total


def _discard(pipe, adapter: str) -> None:
    """Remove whatever a failed load left behind; the checkpoint stays usable."""
    try:
        pipe.delete_adapters(adapter)
    except Exception:  # nothing was injected, or only part of it: both are fine to ignore
        log.debug("nothing to delete for adapter %s", adapter)


def _base(entry: ModelEntry) -> str:
    family = lora_files.family(entry.arch)
    return f"made for {family}" if family != "unknown" else "base model unknown"


def _load_problem(exc: BaseException) -> str:
    text = str(exc)
    if "mismatch" in text or "size" in text and "ignore_mismatched_sizes" in text:
        return "its layers have other sizes than this checkpoint's"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:300]
