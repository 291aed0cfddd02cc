"""Seamless tiling (A1111's "Tiling"): for one request every padded Conv2d of the given models
pads circularly, so the picture wraps around left/right and top/bottom.

Patch with backup: each conv's own padding_mode is saved and written back afterwards, also after
an error, so the cached model comes back exactly as loaded. Only the attribute changes: torch's
Conv2d pads by `_reversed_padding_repeated_twice` (set at init, whatever the mode), so no
weights are touched and nothing is reloaded.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

from torch import nn

CIRCULAR = "circular"


def _padded_convs(modules: tuple[nn.Module | None, ...]) -> list[nn.Conv2d]:
    seen: dict[int, nn.Conv2d] = {}  # a conv shared by two models (or listed twice) is saved once
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d) and any(sub._reversed_padding_repeated_twice):
                seen.setdefault(id(sub), sub)
    return list(seen.values())


@contextmanager
def circular_padding(*modules: nn.Module | None) -> Iterator[None]:
    """Circular padding on every Conv2d with nonzero padding inside `modules` (None skipped)."""
    backup = [(conv, conv.padding_mode) for conv in _padded_convs(modules)]
    try:
        for conv, _mode in backup:
            conv.padding_mode = CIRCULAR
        yield
    finally:
        for conv, mode in backup:
            conv.padding_mode = mode


def for_pipeline(pipe: Any, enabled: bool) -> ContextManager[None]:
    """The request's tiling on a diffusers pipeline's UNet and VAE; a no-op when not enabled."""
    if not enabled:
        return nullcontext()
    return circular_padding(getattr(pipe, "unet", None), getattr(pipe, "vae", None))
