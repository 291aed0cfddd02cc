"""Widgets shared by the txt2img and img2img tabs, registered under "<tab>.<field>"."""
from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines import samplers
from pipelines.request import MAX_SEED
from ui import prompt_tools
from ui.components import ComponentRegistry
from ui.generation import infotext_at
from ui.presets import Preset


def prompt_area(reg: ComponentRegistry, tab: str) -> None:
    """Prompt and negative prompt on the left, Generate / Interrupt on the right."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            reg.add(f"{tab}.prompt", gr.Textbox("", label="Prompt", lines=3, max_lines=12,
                                                placeholder="a watercolor fox in a snowy forest",
                                                elem_id=f"{tab}_prompt"))
            prompt_tools.token_counters(reg, tab, "prompt")
            reg.add(f"{tab}.negative_prompt", gr.Textbox("", label="Negative prompt", lines=2, max_lines=12,
                                                         elem_id=f"{tab}_negative_prompt"))
            prompt_tools.token_counters(reg, tab, "negative_prompt")
        with gr.Column(scale=1, min_width=160):
            reg.add(f"{tab}.generate", gr.Button("Generate", variant="primary", size="lg",
                                                 elem_id=f"{tab}_generate"))
            reg.add(f"{tab}.interrupt", gr.Button("Interrupt", variant="stop", elem_id=f"{tab}_interrupt"))


def sampling_controls(reg: ComponentRegistry, tab: str, preset: Preset,
                      sampler_table: samplers.SamplerTable | None = None, variation_seeds: bool = False) -> None:
    """`sampler_table`: the app's (extensions' samplers are offered after Easel's). `variation_seeds`:
    A1111's "Extra" seed options under the seed (txt2img only: the engine mixes txt2img noise only)."""
    with gr.Row():
        reg.add(f"{tab}.sampler", gr.Dropdown(
            samplers.sampler_names(sampler_table), value=preset.sampler, label="Sampling method",
            allow_custom_value=True, elem_id=f"{tab}_sampler"))
        reg.add(f"{tab}.schedule", gr.Dropdown(
            schedule_choices(preset.sampler, sampler_table), value=preset.schedule, label="Schedule type",
            allow_custom_value=True, elem_id=f"{tab}_schedule"))
    reg.add(f"{tab}.steps", gr.Slider(1, 150, value=preset.steps, step=1, label="Sampling steps",
                                      elem_id=f"{tab}_steps"))
    with gr.Row():
        with gr.Column(scale=3):
            reg.add(f"{tab}.width", gr.Slider(64, 2048, value=preset.width, step=8, label="Width",
                                              elem_id=f"{tab}_width"))
            reg.add(f"{tab}.height", gr.Slider(64, 2048, value=preset.height, step=8, label="Height",
                                               elem_id=f"{tab}_height"))
        with gr.Column(scale=2, min_width=160):
            reg.add(f"{tab}.batch_count", gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                                    elem_id=f"{tab}_batch_count"))
            reg.add(f"{tab}.batch_size", gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                                   elem_id=f"{tab}_batch_size"))
    with gr.Row(equal_height=True):
        reg.add(f"{tab}.cfg_scale", gr.Slider(1, 30, value=preset.cfg_scale, step=0.5, label="CFG scale",
                                              scale=4, elem_id=f"{tab}_cfg_scale"))
        reg.add(f"{tab}.tiling", gr.Checkbox(False, label="Tiling", scale=1, min_width=100,
                                             info="seamless: the image wraps around", elem_id=f"{tab}_tiling"))
    with gr.Row(equal_height=True):
        reg.add(f"{tab}.seed", gr.Number(value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                         label="Seed (-1: random)", scale=4, elem_id=f"{tab}_seed"))
        reg.add(f"{tab}.dice", gr.Button("⚄", scale=0, min_width=48, elem_id=f"{tab}_random_seed"))
        reg.add(f"{tab}.recycle", gr.Button("♻", scale=0, min_width=48, elem_id=f"{tab}_reuse_seed"))
    if variation_seeds:
        with gr.Accordion("Extra seed options", open=False, elem_id=f"{tab}_subseed_show"):
            with gr.Row(equal_height=True):
                reg.add(f"{tab}.subseed", gr.Number(value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                                    label="Variation seed", elem_id=f"{tab}_subseed"))
                reg.add(f"{tab}.subseed_strength", gr.Slider(
                    0, 1, value=0, step=0.01, label="Variation strength",
                    info="0: the seed's image; 1: the variation seed's", elem_id=f"{tab}_subseed_strength"))


def results_panel(reg: ComponentRegistry, tab: str, send_buttons: dict[str, str]) -> None:
    """Gallery, the hidden generation info (JSON, part of the API result), the selected image's
    infotext and "Send to ..." buttons (name -> label). The progress bar shows on its own strip
    above the gallery, so the gallery stays uncovered for the live preview."""
    reg.add(f"{tab}.progress", gr.HTML("", min_height=48, padding=False, elem_id=f"{tab}_progress"))
    reg.add(f"{tab}.gallery", gr.Gallery(label="Output", columns=2, height=520, format="png",
                                         object_fit="contain", interactive=False, type="filepath",
                                         elem_id=f"{tab}_gallery"))
    with gr.Row():
        for name, label in send_buttons.items():
            reg.add(f"{tab}.{name}", gr.Button(label, size="sm", elem_id=f"{tab}_{name}"))
    reg.add(f"{tab}.generation_info", gr.JSON(visible=False, label="Generation info"))
    reg.add(f"{tab}.infotext", gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                          buttons=["copy"], elem_id=f"{tab}_infotext"))
    reg.add(f"{tab}.selected", gr.State(0))


def wire_form(reg: ComponentRegistry, tab: str, sampler_table: samplers.SamplerTable | None = None) -> None:
    """Events inside one tab that never touch the device: all private, none queued."""
    private = dict(api_visibility="private", queue=False)

    def schedule_update(sampler: str, schedule: str):
        choices = schedule_choices(sampler, sampler_table)
        return gr.update(choices=choices, value=schedule if schedule in choices else choices[0])

    reg[f"{tab}.sampler"].change(schedule_update, inputs=[reg[f"{tab}.sampler"], reg[f"{tab}.schedule"]],
                                 outputs=[reg[f"{tab}.schedule"]], **private)
    reg[f"{tab}.dice"].click(lambda: -1, outputs=[reg[f"{tab}.seed"]], **private)
    reg[f"{tab}.recycle"].click(_last_seed, inputs=[reg[f"{tab}.generation_info"], reg[f"{tab}.selected"],
                                                    reg[f"{tab}.seed"]],
                                outputs=[reg[f"{tab}.seed"]], **private)
    reg[f"{tab}.generation_info"].change(lambda info: (infotext_at(info, 0), 0),
                                         inputs=[reg[f"{tab}.generation_info"]],
                                         outputs=[reg[f"{tab}.infotext"], reg[f"{tab}.selected"]], **private)
    reg[f"{tab}.gallery"].select(_on_select, inputs=[reg[f"{tab}.generation_info"]],
                                 outputs=[reg[f"{tab}.infotext"], reg[f"{tab}.selected"]], **private)


def schedule_choices(sampler: str, sampler_table: samplers.SamplerTable | None = None) -> list[str]:
    try:
        return samplers.schedules_for(sampler, sampler_table)
    except ValueError:
        return samplers.schedule_labels()


def _last_seed(info: Any, selected: int | None, current: Any):
    if isinstance(info, dict) and info.get("seeds"):
        seeds = info["seeds"]
        return seeds[selected] if selected is not None and 0 <= selected < len(seeds) else seeds[0]
    return current


def _on_select(info: Any, evt: gr.SelectData):
    return infotext_at(info, evt.index), evt.index
