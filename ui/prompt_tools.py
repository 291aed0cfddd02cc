"""Prompt helpers of the txt2img and img2img tabs: token counters under the prompt boxes
("23/75"), styles (pick several, edit and save them to data/styles.csv), clip skip and the
wildcard mode. Only private, unqueued events: none of them touches the device."""
from __future__ import annotations

import gradio as gr

from pipelines.configs import load_tokenizer
from pipelines.prompts.counter import format_count, prompt_token_count
from pipelines.prompts.encoding import EMPHASIS_MODES
from pipelines.prompts.styles import Style
from pipelines.prompts.wildcards import WILDCARD_MODES
from ui.components import ComponentRegistry
from ui.context import AppContext

FIELDS = ("styles", "clip_skip", "emphasis", "wildcard_mode")


def token_counters(reg: ComponentRegistry, tab: str, box: str) -> None:
    """A small "0/75" under a prompt box (called from forms.prompt_area)."""
    reg.add(f"{tab}.{box}_tokens", gr.HTML(_counter_html((0, 75)), padding=False, elem_id=f"{tab}_{box}_token_counter"))


def _counter_html(count: tuple[int, int]) -> str:
    return f"<div style='text-align:right;font-size:0.8em;opacity:0.7'>{format_count(count)}</div>"


def _style_names(ctx: AppContext) -> list[str]:
    return ctx.prompts.styles.names() if ctx.prompts is not None and ctx.prompts.styles is not None else []


def build(ctx: AppContext, reg: ComponentRegistry, tab: str) -> None:
    """Styles picker, clip skip and wildcard mode; an accordion to edit the styles."""
    with gr.Row(equal_height=True):
        reg.add(f"{tab}.styles", gr.Dropdown(_style_names(ctx), value=[], multiselect=True, label="Styles",
                                             allow_custom_value=True,  # the file may change after start
                                             scale=4, elem_id=f"{tab}_styles"))
        reg.add(f"{tab}.styles_refresh", gr.Button("🔄", scale=0, min_width=48, elem_id=f"{tab}_styles_refresh"))
        reg.add(f"{tab}.clip_skip", gr.Slider(1, 12, value=1, step=1, label="Clip skip", scale=2,
                                              elem_id=f"{tab}_clip_skip"))
        reg.add(f"{tab}.emphasis", gr.Radio(list(EMPHASIS_MODES), value="Original", label="Emphasis", scale=2,
                                            elem_id=f"{tab}_emphasis"))
        reg.add(f"{tab}.wildcard_mode", gr.Radio(list(WILDCARD_MODES), value="random", label="Wildcards",
                                                 scale=2, elem_id=f"{tab}_wildcard_mode"))
    with gr.Accordion("Edit styles", open=False, elem_id=f"{tab}_styles_editor"):
        reg.add(f"{tab}.style_name", gr.Dropdown(_style_names(ctx), value=None, allow_custom_value=True,
                                                 label="Style name", elem_id=f"{tab}_style_name"))
        reg.add(f"{tab}.style_prompt", gr.Textbox("", label="Style prompt ({prompt} marks where your prompt goes)",
                                                  lines=2, elem_id=f"{tab}_style_prompt"))
        reg.add(f"{tab}.style_negative", gr.Textbox("", label="Style negative prompt", lines=2,
                                                    elem_id=f"{tab}_style_negative"))
        with gr.Row():
            reg.add(f"{tab}.style_save", gr.Button("Save style", size="sm", elem_id=f"{tab}_style_save"))
            reg.add(f"{tab}.style_delete", gr.Button("Delete style", size="sm", variant="stop",
                                                     elem_id=f"{tab}_style_delete"))


def wire(ctx: AppContext, reg: ComponentRegistry, tab: str) -> None:
    private = dict(api_visibility="private", queue=False)
    tokenizer = load_tokenizer()  # one per tab, for counting only (no model needed)

    def count(text: str | None, steps: float | None) -> str:
        try:
            return _counter_html(prompt_token_count(tokenizer, text or "", int(steps or 20)))
        except ValueError:  # a half-typed weight such as "(x:1.2.": count nothing rather than fail
            return _counter_html((0, 75))

    for box in ("prompt", "negative_prompt"):
        reg[f"{tab}.{box}"].change(count, inputs=[reg[f"{tab}.{box}"], reg[f"{tab}.steps"]],
                                   outputs=[reg[f"{tab}.{box}_tokens"]], show_progress="hidden", **private)

    store = ctx.prompts.styles if ctx.prompts is not None else None
    picker, name = reg[f"{tab}.styles"], reg[f"{tab}.style_name"]

    def refresh(selected):
        names = _style_names(ctx)
        return (gr.update(choices=names, value=[s for s in selected or [] if s in names]),
                gr.update(choices=names))

    reg[f"{tab}.styles_refresh"].click(refresh, inputs=[picker], outputs=[picker, name], **private)

    def load_style(style_name: str | None):
        for style in store.load() if store is not None else []:
            if style.name == style_name:
                return style.prompt, style.negative_prompt
        return gr.skip(), gr.skip()

    name.change(load_style, inputs=[name], outputs=reg.many(f"{tab}.style_prompt", f"{tab}.style_negative"),
                **private)

    def save(style_name, prompt, negative, selected):
        if store is None:
            raise gr.Error("styles are not available", print_exception=False)
        try:
            store.save(Style((style_name or "").strip(), prompt or "", negative or ""))
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        gr.Info(f"Saved style '{style_name.strip()}'")
        return refresh(selected)

    def delete(style_name, selected):
        if store is None:
            raise gr.Error("styles are not available", print_exception=False)
        try:
            store.delete(style_name or "")
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        names = _style_names(ctx)
        return (gr.update(choices=names, value=[s for s in selected or [] if s in names]),
                gr.update(choices=names, value=None))

    reg[f"{tab}.style_save"].click(save, inputs=[name, reg[f"{tab}.style_prompt"], reg[f"{tab}.style_negative"],
                                                 picker], outputs=[picker, name], **private)
    reg[f"{tab}.style_delete"].click(delete, inputs=[name, picker], outputs=[picker, name], **private)
