"""Device and dtype choice, made once in main() from the settings (never at import)."""
from __future__ import annotations

import torch


def resolve_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if setting == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(setting)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        # Half precision on CPU is slow and loses accuracy in the VAE; fp32 is the only sane choice.
        return torch.float32
    return {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp32": torch.float32}[precision]
