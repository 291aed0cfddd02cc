"""Reading LoRA files and deciding whether one fits a checkpoint, before diffusers touches it.

Formats diffusers' `load_lora_weights` reads as they are (nothing converted here):
- kohya / A1111 (`lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`, with `.alpha`),
  including LyCORIS LoCon (the same `lora_down` / `lora_up` keys on convolutions);
- diffusers / PEFT (`unet.*` / `text_encoder.*` with `lora_A` / `lora_B`, old `.lora.down`).
LyCORIS LoHa (`hada_*`) and LoKr (`lokr_*`) are rewritten as exact LoRA factors first
(pipelines/adapters/lycoris.py). Their CP/Tucker variants, full-diff and norm modules are refused
with a clear message.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipelines.arch import Arch

# Architectures whose LoRAs are interchangeable (same module names and widths).
_FAMILIES = {Arch.SD1: "SD1", Arch.SD1_INPAINT: "SD1", Arch.SD2: "SD2", Arch.SD2_V: "SD2",
             Arch.SDXL: "SDXL", Arch.SDXL_REFINER: "SDXL refiner", Arch.TINYWORLD: "tiny-world"}
_UNSUPPORTED_MARKERS = {".hada_t1": "LyCORIS LoHa with CP decomposition", ".lokr_t2": "LyCORIS LoKr with CP decomposition",
                        ".diff": "LyCORIS full-diff", ".w_norm": "LyCORIS norm"}
# One key per adapted layer: the down / A matrix, LoHa's first factor, LoKr's first Kronecker factor.
_MODULE_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".hada_w1_a", ".lokr_w1",
                    ".lokr_w1_a")


def family(arch: Arch) -> str:
    return _FAMILIES.get(arch, "unknown")


def read_lora_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA file; pickles only through torch's weights-only unpickler."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"LoRA {path.name} needs full unpickling (unsafe); convert it to .safetensors.") from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"LoRA {path.name} does not hold a tensor dictionary.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_supported_format(name: str, state_dict: dict[str, torch.Tensor]) -> None:
    for marker, kind in _UNSUPPORTED_MARKERS.items():
        if any(marker in key for key in state_dict):
            raise ValueError(f"LoRA {name} is a {kind} file, which Easel cannot apply yet; "
                             "use a LoRA, LoCon, LoHa or LoKr version of it.")


def check_fits(name: str, lora_arch: Arch, checkpoint_name: str, checkpoint_arch: Arch) -> None:
    """Refuse a LoRA whose known base family differs from the checkpoint's."""
    if lora_arch is Arch.UNKNOWN or family(lora_arch) == family(checkpoint_arch):
        return
    raise ValueError(f"LoRA {name} was made for {family(lora_arch)} models, but the loaded checkpoint "
                     f"{checkpoint_name} is {family(checkpoint_arch)}; pick a {family(checkpoint_arch)} "
                     "LoRA or switch the checkpoint.")


def lora_module_count(state_dict: dict[str, torch.Tensor]) -> int:
    """How many layers the file adapts."""
    return sum(1 for key in state_dict if key.endswith(_MODULE_SUFFIXES))
