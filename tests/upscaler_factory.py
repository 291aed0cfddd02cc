"""Tiny RRDB-ESRGAN upscaler files for tests, written tensor by tensor under the key names real
files use (not through a model class), in the original ESRGAN or the BasicSR layout, and tiny
files of other architectures built with spandrel's own classes."""
from pathlib import Path

import torch

# original ESRGAN (an nn.Sequential): per scale, the slots of the upsample convs, the HR conv and
# the last conv, as in real files (4x: RRDB_ESRGAN_x4.pth, 4x-UltraSharp.pth, ...)
OLD_LAYOUT_SLOTS = {1: (2, 4), 2: (3, 5, 7), 4: (3, 6, 8, 10)}


def tiny_esrgan_state(scale: int = 2, seed: int = 0, nf: int = 8, gc: int = 32, nb: int = 1,
                      old_layout: bool = False) -> dict[str, torch.Tensor]:
    """Random weights of a tiny RRDBNet (growth 32, as in every real file; spandrel assumes it). Small weights and a 0.5 bias on the last conv keep the
    output mostly inside [0, 1], so comparisons are not hidden by clamping."""
    generator = torch.Generator().manual_seed(seed)
    upsamples = {1: 0, 2: 1, 4: 2}[scale]

    def conv(name: str, fan_in: int, fan_out: int, bias: float = 0.0, gain: float = 1.4) -> dict:
        weight = torch.randn(fan_out, fan_in, 3, 3, generator=generator) * (gain / (fan_in * 9) ** 0.5)
        return {f"{name}.weight": weight,
                f"{name}.bias": torch.randn(fan_out, generator=generator) * 0.01 + bias}

    slots = OLD_LAYOUT_SLOTS[scale]
    names = ({"first": "model.0", "trunk": f"model.1.sub.{nb}", "hr": f"model.{slots[-2]}",
              "last": f"model.{slots[-1]}", "up": [f"model.{slot}" for slot in slots[:-2]]}
             if old_layout else
             {"first": "conv_first", "trunk": "conv_body", "hr": "conv_hr", "last": "conv_last",
              "up": [f"conv_up{i + 1}" for i in range(upsamples)]})
    state = conv(names["first"], 3, nf)
    for block in range(nb):
        for rdb in range(1, 4):
            for j in range(1, 6):
                name = (f"model.1.sub.{block}.RDB{rdb}.conv{j}.0" if old_layout
                        else f"body.{block}.rdb{rdb}.conv{j}")
                state |= conv(name, nf + (j - 1) * gc, gc if j < 5 else nf)
    state |= conv(names["trunk"], nf, nf)
    for name in names["up"]:
        state |= conv(name, nf, nf)
    state |= conv(names["hr"], nf, nf)
    state |= conv(names["last"], nf, 3, bias=0.5, gain=0.1)
    return state


def tiny_esrgan(scale: int = 2, seed: int = 0, nf: int = 8, gc: int = 4, nb: int = 1):
    """A built-in RRDBNet with such weights (for tiling tests; a small growth keeps them fast)."""
    from pipelines.rrdb import build_rrdb

    return build_rrdb(tiny_esrgan_state(scale, seed, nf, gc, nb))


def save_weights(path, state: dict[str, torch.Tensor], wrapper: str | None = "params_ema") -> Path:
    """`.safetensors` by suffix, else a weights-only pickle (under `wrapper`, as BasicSR saves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrapper: state} if wrapper else state, path)
    return path


def write_tiny_esrgan(path, scale: int = 2, seed: int = 0, old_layout: bool = False) -> Path:
    """A weights-only .pth (or .safetensors, by suffix) tiny ESRGAN; `old_layout` writes the
    original ESRGAN key names (`model.0`, `model.1.sub...`, bare state dict), else BasicSR's
    (`conv_first`, `body...`, under `params_ema`)."""
    state = tiny_esrgan_state(scale, seed, old_layout=old_layout)
    return save_weights(path, state, wrapper=None if old_layout else "params_ema")


def write_tiny_compact(path, scale: int = 2, seed: int = 0) -> Path:
    """A tiny Real-ESRGAN Compact (SRVGGNet) file, built with spandrel's class (needs spandrel)."""
    from spandrel.architectures.Compact import Compact

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    return save_weights(path, model.state_dict())


def write_tiny_swinir(path, scale: int = 2, seed: int = 0) -> Path:
    """A tiny SwinIR (one residual group of two blocks, window 4, pixel-shuffle-direct upsampling,
    the lightweight variant), built with spandrel's class (needs spandrel)."""
    from spandrel.architectures.SwinIR import SwinIR

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                       mlp_ratio=2.0, upscale=scale, img_range=1.0, upsampler="pixelshuffledirect",
                       resi_connection="1conv")
    return save_weights(path, model.state_dict())
