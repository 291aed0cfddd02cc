"""Where extensions' UI goes: their own tabs, and accordions in the txt2img / img2img column.

An extension's `build(ui)` gets an `ExtensionUI`: named, read-only lookups of the tab's form and
a way to run requests through the job queue, never the component registry itself (A1111's
`on_before_component` let extensions rewrite any widget; that is what we avoid). A build that
raises is recorded on the extension and the rest of the UI is built as usual.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from pipelines.request import GenerationRequest, GenerationResult
from ui.generation import owner_of
from ui.request_builder import IMG2IMG_FIELDS, MODEL_FIELDS, TXT2IMG_FIELDS, img2img_request, txt2img_request

log = logging.getLogger("easel.extensions")
_FORMS = {"txt2img": (TXT2IMG_FIELDS, txt2img_request), "img2img": (IMG2IMG_FIELDS, img2img_request)}


class ExtensionUI:
    def __init__(self, ctx: Any, reg: Any, extension: str, tab: str | None) -> None:
        self._ctx = ctx
        self._reg = reg
        self.extension = extension
        self.tab = tab  # "txt2img" / "img2img" for accordions; None in an extension's own tab

    def form_inputs(self, tab: str | None = None) -> dict[str, Any]:
        """{field: component} of a generation tab's form (with checkpoint and vae), for
        `inputs_kwargs=` of an event; the handler then calls `request_from(values)`."""
        tab = tab or self.tab or "txt2img"
        fields, _build = _FORMS[tab]
        return self._reg.keyword_inputs(fields, prefix=f"{tab}.") | self._reg.keyword_inputs(MODEL_FIELDS)

    def request_from(self, values: dict[str, Any], tab: str | None = None) -> GenerationRequest:
        _fields, build = _FORMS[tab or self.tab or "txt2img"]
        return build(values, getattr(self._ctx, "additions", None))

    def owner(self, gradio_request: Any) -> str:
        """The job owner of the user behind a Gradio event (fair queue, own-only cancel)."""
        return owner_of(gradio_request)

    def run(self, request: GenerationRequest, owner: str = "") -> GenerationResult:
        """Run one request on the shared job queue and wait for it."""
        return self._ctx.jobs.submit(request, owner or f"ext:{self.extension}").result()

    def save_image(self, image: Any, infotext: str, category: str, seed: int = 0) -> Path:
        """Save an extension's own image (a grid, say) with its infotext into outputs/<category>."""
        return self._ctx.outputs.save(image, category=category, seed=seed, infotext=infotext)

    def setting(self, name: str) -> Any:
        return getattr(self._ctx.settings, name)


def _build_isolated(record: Any, title: str, build: Callable, ui: ExtensionUI) -> None:
    try:
        build(ui)
    except Exception as exc:
        record.record_hook_error(f"UI '{title}'", exc)
        log.error("extension '%s': building '%s' failed", record.name, title, exc_info=exc)
        gr.Markdown(f"Extension **{record.name}** failed to build this part: `{type(exc).__name__}: {exc}`")


def extension_accordions(ctx: Any, reg: Any, tab: str) -> None:
    """Call inside a generation tab's settings column."""
    if ctx.extensions is None:
        return
    seen: dict[str, int] = {}
    for record, title, build in ctx.extensions.accordions(tab):
        seen[record.name] = seen.get(record.name, 0) + 1
        suffix = "" if seen[record.name] == 1 else f"_{seen[record.name]}"
        with gr.Accordion(title, open=False, elem_id=f"ext_{record.name}_{tab}_accordion{suffix}"):
            _build_isolated(record, title, build, ExtensionUI(ctx, reg, record.name, tab))


def extension_tabs(ctx: Any, reg: Any) -> None:
    """Call inside the main gr.Tabs."""
    if ctx.extensions is None:
        return
    for index, (record, title, build) in enumerate(ctx.extensions.tabs()):
        with gr.Tab(title, id=f"ext_{index}_{record.name}"):
            _build_isolated(record, title, build, ExtensionUI(ctx, reg, record.name, None))
