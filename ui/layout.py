"""The whole UI: top bar, tabs, cross-tab wiring. Returns the Blocks and its component registry."""
from __future__ import annotations

import gradio as gr

from ui import (control_tab, extensions_tab, extra_networks_tab, extras_tab, hires_controls, history_panel, img2img,
                merger_tab, png_info, queue_panel, settings_tab, topbar, transfers, txt2img)
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.extension_slots import extension_tabs

# Gradio 6 takes theme and css at launch(); app.main passes these.
CSS = """
#txt2img_generate, #img2img_generate { min-height: 5.5em; }
#easel_topbar { align-items: end; }
"""


def launch_style() -> dict:
    return {"theme": gr.themes.Default(primary_hue="orange"), "css": CSS}


def build_ui(ctx: AppContext) -> tuple[gr.Blocks, ComponentRegistry]:
    reg = ComponentRegistry()
    with gr.Blocks(title="Easel", analytics_enabled=False) as blocks:
        topbar.build(ctx, reg)
        with gr.Tabs(selected="txt2img") as tabs:
            reg.add("tabs", tabs)
            txt2img.build(ctx, reg)
            img2img.build(ctx, reg)
            extra_networks_tab.build(ctx, reg)
            extras_tab.build(ctx, reg)
            png_info.build(ctx, reg)
            merger_tab.build(ctx, reg)
            extension_tabs(ctx, reg)
            extensions_tab.build(ctx, reg)
            settings_tab.build(ctx, reg)
        queue_panel.build(ctx, reg)
        history_panel.build(ctx, reg)
        topbar.wire(ctx, reg)
        merger_tab.wire(ctx, reg)
        transfers.build(ctx, reg)
        hires_controls.wire_paste(reg)
        hires_controls.wire_refresh(ctx, reg)
        control_tab.wire_paste(ctx, reg)
        extra_networks_tab.wire_paste(ctx, reg)
    # One device: generation events share the "device" concurrency group; the job queue
    # underneath orders them fairly between users and runs one at a time.
    blocks.queue(max_size=64)
    return blocks, reg
