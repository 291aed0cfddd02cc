"""The hook points of one generation, as one object passed into `generate(..., hooks=)`.

This base class does nothing: it is the default, so the engine runs the same with or without
extensions. The extension framework subclasses it (extensions/hooks.py) and isolates each
extension's call. The engine never looks hooks up in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.request import GenerationRequest


@dataclass(frozen=True)
class StepInfo:
    """What `on_step` sees after each sampling step (read-only: changing it changes nothing)."""
    step: int  # steps done in this batch, 1-based
    total_steps: int
    batch_index: int
    batch_count: int
    seeds: tuple[int, ...]
    request: GenerationRequest


class GenerationHooks:
    """No-op hooks. Each method's return value is what the engine goes on with."""

    def before_generate(self, request: GenerationRequest) -> GenerationRequest:
        return request

    def on_step(self, info: StepInfo) -> None:
        return None

    def after_image(self, image: Image.Image, request: GenerationRequest) -> Image.Image:
        return image

    def extend_infotext(self, request: GenerationRequest, params: dict[str, Any]) -> dict[str, Any]:
        """`params` plus extension fields (never replacing the engine's own keys)."""
        return params

    def image_saved(self, path: Path, infotext: str) -> None:
        return None

    def model_loaded(self, snapshot: dict[str, Any]) -> None:
        return None


NO_HOOKS = GenerationHooks()  # stateless, so one shared instance is safe
