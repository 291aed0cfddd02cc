"""The History panel: the images you made, newest first, from the history index
(pipelines/history.py) instead of a walk over the outputs folder. Public API: `/history`.

Whose images: with logins, your own ("user:<login>", whether made in the UI or over the REST
API); without logins everyone is the same local user, so every saved image is listed (the
outputs folder is open to anyone who can reach the app anyway)."""
from __future__ import annotations

from typing import Any

import gradio as gr

from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.generation import owner_of

MAX_ENTRIES = 100


def history_view(ctx: AppContext, request: Any, limit: int = MAX_ENTRIES) -> dict[str, Any]:
    index = getattr(ctx.outputs, "history", None)
    if index is None:
        return {"you": owner_of(request), "entries": []}
    viewer = owner_of(request)
    owner = viewer if ctx.authenticator is not None else None
    entries = index.entries(owner=owner, limit=max(1, min(int(limit), 1000)))
    return {"you": viewer, "entries": [index.public_entry(e) for e in entries]}


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    with gr.Accordion("History", open=False, elem_id="easel_history"):
        reg.add("history.refresh", gr.Button("Show my images", size="sm", elem_id="history_refresh"))
        reg.add("history.gallery", gr.Gallery(label="Your images, newest first", columns=6, height=360,
                                              type="filepath", interactive=False, elem_id="history_gallery"))
        reg.add("history.entries", gr.JSON(label="Details", visible=False))

    def history(request: gr.Request) -> dict[str, Any]:
        """Your saved images, newest first (path, prompt, seed, model...); without logins, everyone's."""
        return history_view(ctx, request)

    def gallery(view: dict[str, Any] | None) -> list[tuple[str, str]]:
        return [(e["file"], e["prompt"][:60]) for e in (view or {}).get("entries", [])]

    reg["history.refresh"].click(history, outputs=[reg["history.entries"]], api_name="history", queue=False) \
        .then(gallery, inputs=[reg["history.entries"]], outputs=[reg["history.gallery"]], api_visibility="private",
              queue=False)
