"""Tiny RRDB-ESRGAN upscaler files for tests, in the original ESRGAN or the BasicSR layout."""
from pathlib import Path

import torch

from pipelines.rrdb import RRDBNet, to_old_layout


def tiny_esrgan(scale: int = 2, seed: int = 0, nf: int = 8, gc: int = 4, nb: int = 1) -> RRDBNet:
    upsamples = {1: 0, 2: 1, 4: 2}[scale]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RRDBNet(3, 3, nf, gc, nb, upsamples).eval()


def write_tiny_esrgan(path, scale: int = 2, seed: int = 0, old_layout: bool = False) -> Path:
    """A weights-only .pth (or .safetensors, by suffix) tiny ESRGAN; `old_layout` writes the
    original ESRGAN key names (`model.0`, `model.1.sub...`), else BasicSR's (`conv_first`, `body...`)."""
    state = tiny_esrgan(scale, seed).state_dict()
    if old_layout:
        state = to_old_layout(state)
    else:
        state = {k.replace("upconvs.0", "conv_up1").replace("upconvs.1", "conv_up2"): v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"params_ema": state}, path)
    return path
