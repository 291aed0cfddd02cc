"""The engine's hook points fanned out to every loaded extension, each call isolated.

An exception in one extension's hook is logged with the extension's name and recorded for the
Extensions tab; the generation goes on with the value it had before that hook.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from pipelines.hooks import GenerationHooks, StepInfo
from pipelines.request import GenerationRequest

log = logging.getLogger("easel.extensions")

ErrorSink = Callable[[str, str, BaseException], None]  # (extension, hook, exception)
# Keys Easel itself writes (some only for some requests, "Seed" after the extensions' fields):
# an extension's field never replaces them, whether or not this request has them.
EASEL_INFOTEXT_KEYS = frozenset({
    "Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size",
    "Size-1", "Size-2", "Model hash", "Model", "VAE hash", "VAE", "Denoising strength", "Clip skip",
    "Emphasis", "RNG", "Mask blur", "Mask mode", "Inpaint area", "Masked area padding", "Masked content",
    "Lora hashes", "TI hashes", "Hypernet", "Hypernet hash", "Hypernet hashes", "Hires upscale",
    "Hires resize", "Hires steps", "Hires upscaler", "Hires checkpoint", "Hires sampler", "Hires prompt",
    "Hires negative prompt", "Refiner", "Refiner switch at", "GLIGEN", "GLIGEN boxes", "Styles array",
    "Version"})


class ExtensionHooks(GenerationHooks):
    """`entries`: (extension name, hook name, function) in load order; `infotext_fields`:
    (extension name, key, value function)."""

    def __init__(self, entries: Sequence[tuple[str, str, Callable]] = (),
                 infotext_fields: Sequence[tuple[str, str, Callable]] = (),
                 on_error: ErrorSink | None = None) -> None:
        self._entries = tuple(entries)
        self._infotext_fields = tuple(infotext_fields)
        self._on_error = on_error or (lambda _ext, _hook, _exc: None)

    def _calls(self, hook: str):
        return [(ext, fn) for ext, name, fn in self._entries if name == hook]

    def _failed(self, ext: str, hook: str, exc: BaseException) -> None:
        log.error("extension '%s': hook %s failed; going on without it", ext, hook, exc_info=exc)
        self._on_error(ext, hook, exc)

    def _notify(self, hook: str, *args: Any) -> None:
        for ext, fn in self._calls(hook):
            try:
                fn(*args)
            except Exception as exc:
                self._failed(ext, hook, exc)

    def before_generate(self, request: GenerationRequest) -> GenerationRequest:
        for ext, fn in self._calls("before_generate"):
            try:
                changed = fn(request)
                if changed is None:
                    continue
                if not isinstance(changed, GenerationRequest):
                    raise TypeError(f"returned {type(changed).__name__}, not a GenerationRequest")
                request = changed
            except Exception as exc:
                self._failed(ext, "before_generate", exc)
        return request

    def on_step(self, info: StepInfo) -> None:
        self._notify("on_step", info)

    def after_image(self, image: Image.Image, request: GenerationRequest) -> Image.Image:
        for ext, fn in self._calls("after_image"):
            try:
                changed = fn(image, request)
                if changed is None:
                    continue
                if not isinstance(changed, Image.Image):
                    raise TypeError(f"returned {type(changed).__name__}, not a PIL image")
                image = changed
            except Exception as exc:
                self._failed(ext, "after_image", exc)
        return image

    def extend_infotext(self, request: GenerationRequest, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        for ext, key, value_of in self._infotext_fields:
            try:
                if key in params or key in EASEL_INFOTEXT_KEYS or key.startswith("ControlNet "):
                    raise ValueError(f"infotext key '{key}' is Easel's own or already used: pick another key")
                value = value_of(request)
                if value is not None:
                    params[key] = value
            except Exception as exc:
                self._failed(ext, f"infotext field {key}", exc)
        return params

    def image_saved(self, path: Path, infotext: str) -> None:
        self._notify("image_saved", path, infotext)

    def model_loaded(self, snapshot: dict[str, Any]) -> None:
        self._notify("model_loaded", snapshot)

    def app_started(self, app: Any) -> None:
        self._notify("app_started", app)
