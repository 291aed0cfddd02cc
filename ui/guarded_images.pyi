"""Image inputs that check an upload before Gradio decodes it.

`gr.Image(type="pil")` decodes in Gradio's preprocess, where a non-image gives a long
multi-line error naming server paths and only PIL's global bomb guard applies. These
subclasses read the header first with `pipelines.uploads.check_image_file` and refuse with a
short message; then Gradio's own preprocessing runs as usual. `is_template` keeps the
browser using the stock Image / ImageEditor front-end."""
from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.uploads import DEFAULT_MAX_PIXELS, check_image_file


def _check(value: Any, max_pixels: int) -> None:
    path = getattr(value, "path", None)
    if path:
        try:
            check_image_file(path, max_pixels=max_pixels)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

from gradio.events import Dependency

class GuardedImage(gr.Image):
    is_template = True
    max_pixels = DEFAULT_MAX_PIXELS  # per instance via guarded(); class default for safety

    def preprocess(self, payload):
        if payload is not None:
            _check(payload, self.max_pixels)
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class GuardedImageEditor(gr.ImageEditor):
    is_template = True
    max_pixels = DEFAULT_MAX_PIXELS

    def preprocess(self, payload):
        if payload is not None:
            for part in [getattr(payload, "background", None), getattr(payload, "composite", None),
                         *(getattr(payload, "layers", None) or [])]:
                _check(part, self.max_pixels)
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


def guarded(component, max_pixels: int):
    component.max_pixels = max_pixels
    return component