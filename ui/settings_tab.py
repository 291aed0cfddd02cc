"""Settings tab (minimal for now): the start-up settings and what the engine has loaded."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import gradio as gr

from ui.components import ComponentRegistry
from ui.context import AppContext

HIDDEN_SETTINGS = ("auth", "api_auth")  # passwords never go to the browser


def settings_view(settings: Any) -> dict[str, Any]:
    view = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in HIDDEN_SETTINGS and value:
            value = "***"
        view[f.name] = str(value) if isinstance(value, Path) else value
    view["models_root"] = str(settings.models_root)
    view["embeddings_root"] = str(settings.embeddings_root)
    view["outputs_dir"] = str(settings.outputs_dir)
    return view


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    with gr.Tab("Settings", id="settings") as tab:
        gr.Markdown("Start-up settings come from defaults < `data/config.json` < `EASEL_*` "
                    "environment variables < command-line flags; restart to change them.")
        with gr.Row(equal_height=False):
            reg.add("settings.values", gr.JSON(settings_view(ctx.settings), label="Settings"))
            reg.add("settings.engine", gr.JSON(label="Engine state (loaded models, RAM cache)"))
        reg.add("settings.refresh", gr.Button("Refresh engine state", elem_id="settings_refresh"))
    # Read when the tab opens or on request; the snapshot is a cheap dict under the manager's lock.
    for trigger in (tab.select, reg["settings.refresh"].click):
        trigger(lambda: ctx.manager.snapshot(), outputs=[reg["settings.engine"]],
                api_visibility="private", queue=False)
