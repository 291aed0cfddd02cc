"""Which model family a standalone VAE was made for, when the file says so.

A real SDXL VAE has exactly the tensor names and shapes of an SD1/SD2 VAE (only the latent
scaling factor differs, 0.13025 vs 0.18215, and that is not stored in a single file), so it
loads into an SD1.5 pipeline without error and gives washed-out, wrong-coloured pictures. The
weights cannot tell; these can:
- ModelSpec metadata: `modelspec.architecture` "stable-diffusion-xl-..." (SDXL) or
  "stable-diffusion-v1..." / "stable-diffusion-v2..." (SD1/SD2);
- a diffusers folder's `config.json` (or `vae/config.json`): `scaling_factor` 0.13025 is SDXL's;
- the file name: "sdxl" in it (sdxl_vae.safetensors, sdxl-vae-fp16-fix, ...), as people name them.
A1111's reference lists no VAE hashes to match, so none are used. A bare, renamed SDXL VAE
without metadata cannot be told apart and loads as any VAE would.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipelines.arch import Arch

SDXL_SCALING_FACTOR = 0.13025
_SDXL_NAME = re.compile(r"sdxl", re.IGNORECASE)


def vae_family(entry: Any) -> tuple[str, str] | None:
    """("sdxl" | "sd", how we know) for a VAE entry, or None when nothing says."""
    architecture = str((getattr(entry, "metadata", None) or {}).get("modelspec.architecture", "")).lower()
    if architecture.startswith("stable-diffusion-xl"):
        return "sdxl", f"its ModelSpec architecture is {architecture}"
    if architecture.startswith(("stable-diffusion-v1", "stable-diffusion-v2")):
        return "sd", f"its ModelSpec architecture is {architecture}"
    path = Path(getattr(entry, "path", ""))
    if getattr(entry, "format", "") == "diffusers":
        factor = _folder_scaling_factor(path)
        if factor is not None:
            return ("sdxl" if abs(factor - SDXL_SCALING_FACTOR) < 1e-6 else "sd",
                    f"its config.json has scaling_factor {factor:g}")
    if _SDXL_NAME.search(str(getattr(entry, "name", "")) or path.name):
        return "sdxl", "its file name says SDXL"
    return None


def check_vae_fits(entry: Any, arch: Arch, checkpoint_name: str | None = None) -> None:
    """ValueError naming the VAE and the checkpoint when the VAE is known to be for the other family."""
    found = vae_family(entry)
    if found is None or arch is Arch.UNKNOWN:
        return
    family, reason = found
    checkpoint = f"the {arch.value} checkpoint {checkpoint_name}" if checkpoint_name else f"a {arch.value} checkpoint"
    if family == "sdxl" and not arch.is_sdxl:
        raise ValueError(f"VAE {entry.name} is an SDXL VAE ({reason}) and does not fit {checkpoint}; "
                         "pick a VAE made for it, or Automatic")
    if family == "sd" and arch.is_sdxl:
        raise ValueError(f"VAE {entry.name} is an SD1/SD2 VAE ({reason}) and does not fit {checkpoint}; "
                         "pick an SDXL VAE, or Automatic")


def _folder_scaling_factor(folder: Path) -> float | None:
    for config in (folder / "config.json", folder / "vae" / "config.json"):
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("scaling_factor")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            return float(value)
    return None
