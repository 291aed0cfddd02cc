"""Image inputs that check an upload before Gradio decodes it.

`gr.Image` / `gr.ImageEditor` decode in Gradio's preprocess, where a non-image gives a long
multi-line error naming server paths and only PIL's global bomb guard applies.
`guard_uploads(component, max_pixels)` makes that one component read each uploaded file's
header first (`pipelines.uploads.check_image_file`) and refuse with a short message; then
Gradio's own preprocessing runs as usual. It is bound to the instance, not a subclass:
Gradio writes a .pyi file next to the source of every Component subclass it sees."""
from __future__ import annotations

import types
from typing import Any

import gradio as gr

from pipelines.uploads import check_image_file


def _uploaded_files(payload: Any) -> list[Any]:
    """The FileData parts of an Image (itself) or ImageEditor (background, composite, layers) value."""
    if hasattr(payload, "background") or hasattr(payload, "layers"):
        return [getattr(payload, "background", None), getattr(payload, "composite", None),
                *(getattr(payload, "layers", None) or [])]
    return [payload]


def _guarded_preprocess(self, payload):
    for part in _uploaded_files(payload) if payload is not None else []:
        path = getattr(part, "path", None)
        if path:
            try:
                check_image_file(path, max_pixels=self.easel_max_pixels)
            except ValueError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
    return type(self).preprocess(self, payload)


def guard_uploads(component, max_pixels: int):
    component.easel_max_pixels = max_pixels
    # A bound method on the instance: deepcopies of the component (Gradio session state) rebind it.
    component.preprocess = types.MethodType(_guarded_preprocess, component)
    return component
