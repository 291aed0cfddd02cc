"""RRDB-ESRGAN (ESRGAN, Real-ESRGAN, BSRGAN, 4x-UltraSharp...), our own small implementation:
the fallback when spandrel (the upscaler loader, `pipelines.upscalers`) cannot be imported; it
imports every architecture it knows, and some need torchvision. Both key layouts are read:

- original ESRGAN, an nn.Sequential: `model.0` (first conv), `model.1.sub.<i>.RDB<k>.conv<j>.0`,
  `model.1.sub.<nb>` (trunk conv), then per x2 upsample [Upsample, conv, LeakyReLU] (convs at
  `model.3`, `model.6`, ...), then the HR conv, a LeakyReLU and the last conv: x4 files hold
  `model.3/6/8/10`, x2 `model.3/5/7`, x1 `model.2/4`;
- BasicSR / Real-ESRGAN: `conv_first`, `body.<i>.rdb<k>.conv<j>`, `conv_body`, `conv_up1`,
  `conv_up2`, `conv_hr`, `conv_last` (x2 / x1 models pixel-unshuffle their input first).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_NEW_RDB = re.compile(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)")
_OLD_CONV = re.compile(r"model\.(\d+)\.(weight|bias)")


class _DenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = _DenseBlock(nf, gc), _DenseBlock(nf, gc), _DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """Input and output are RGB in [0, 1], shape [N, 3, H, W]; output is `scale` times larger."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, gc: int, nb: int, upsamples: int, unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2 ** upsamples // unshuffle
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.body = nn.Sequential(*[_RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconvs = nn.ModuleList(nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(upsamples))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.upconvs:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def is_rrdb(state: dict) -> bool:
    return "conv_first.weight" in state and any(k.startswith("body.0.rdb1.") for k in state) \
        or "model.0.weight" in state and any(k.startswith("model.1.sub.0.RDB1.") for k in state)


def to_internal_keys(state: dict) -> dict:
    """Either layout -> this module's parameter names."""
    if "conv_first.weight" in state:
        renamed = {}
        for key, tensor in state.items():
            match = _NEW_RDB.fullmatch(key)
            if match:
                block, rdb, conv, param = match.groups()
                key = f"body.{block}.rdb{rdb}.conv{conv}.{param}"
            else:
                key = re.sub(r"^conv_up(\d)\.", lambda m: f"upconvs.{int(m.group(1)) - 1}.", key)
            renamed[key] = tensor
        return renamed
    convs = sorted({int(m.group(1)) for k in state if (m := _OLD_CONV.fullmatch(k))})
    trunk = max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.", k)))
    # after the first conv (0) and the trunk (1): upsample convs every 3 slots, then HR and last
    tail = [c for c in convs if c >= 2]
    upsamples = len(tail) - 2
    names = {0: "conv_first"} | {c: f"upconvs.{i}" for i, c in enumerate(tail[:upsamples])}
    names |= {tail[-2]: "conv_hr", tail[-1]: "conv_last"}
    renamed = {}
    for key, tensor in state.items():
        match = _OLD_RDB.fullmatch(key)
        if match:
            block, rdb, conv, param = match.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{param}"] = tensor
        elif key.startswith(f"model.1.sub.{trunk}."):
            renamed["conv_body." + key.rsplit(".", 1)[1]] = tensor
        elif match := _OLD_CONV.fullmatch(key):
            renamed[f"{names[int(match.group(1))]}.{match.group(2)}"] = tensor
    return renamed


def build_rrdb(state: dict) -> RRDBNet:
    """An RRDBNet with the sizes found in the weights (either layout), weights loaded, eval mode."""
    internal = to_internal_keys(state)
    in_nc = internal["conv_first.weight"].shape[1]
    out_nc = internal["conv_last.weight"].shape[0]
    nf = internal["conv_first.weight"].shape[0]
    gc = internal["body.0.rdb1.conv1.weight"].shape[0]
    nb = len({k.split(".")[1] for k in internal if k.startswith("body.")})
    upsamples = len({k.split(".")[1] for k in internal if k.startswith("upconvs.")})
    unshuffle = int(math.isqrt(in_nc // out_nc)) if in_nc > out_nc else 1
    model = RRDBNet(in_nc, out_nc, nf, gc, nb, upsamples, unshuffle)
    model.load_state_dict(internal, strict=True)
    return model.eval().requires_grad_(False)


def to_old_layout(internal: dict) -> dict:
    """This module's names -> the original ESRGAN layout (for tests and conversions)."""
    nb = len({k.split(".")[1] for k in internal if k.startswith("body.")})
    upsamples = len({k.split(".")[1] for k in internal if k.startswith("upconvs.")})
    slots = {"conv_first": 0, **{f"upconvs.{i}": 3 + 3 * i for i in range(upsamples)},
             "conv_hr": 2 + 3 * upsamples, "conv_last": 4 + 3 * upsamples}
    old = {}
    for key, tensor in internal.items():
        module, param = key.rsplit(".", 1)
        if match := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)", module):
            block, rdb, conv = match.groups()
            old[f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0.{param}"] = tensor
        elif module == "conv_body":
            old[f"model.1.sub.{nb}.{param}"] = tensor
        else:
            old[f"model.{slots[module]}.{param}"] = tensor
    return old
