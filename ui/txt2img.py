"""txt2img tab. Its Generate button is the public `txt2img` API endpoint."""
from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from ui import control_tab, forms, hires_controls, prompt_tools
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.errors import user_error
from ui.extension_slots import extension_accordions
from ui.generation import owner_of, stream_job, wire_generate_buttons
from ui.request_builder import MODEL_FIELDS, TXT2IMG_FIELDS, txt2img_request
from ui.topbar import preset_for_checkpoint

TAB = "txt2img"


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    preset = preset_for_checkpoint(ctx, reg["checkpoint"].value)
    with gr.Tab("txt2img", id=TAB):
        forms.prompt_area(reg, TAB)
        prompt_tools.build(ctx, reg, TAB)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                forms.sampling_controls(reg, TAB, preset, ctx.additions.samplers, variation_seeds=True)
                hires_controls.build(ctx, reg, TAB)
                extension_accordions(ctx, reg, TAB)
                control_tab.build(ctx, reg, TAB)
            with gr.Column(scale=1):
                forms.results_panel(reg, TAB, {"send_to_img2img": "Send to img2img"})
    forms.wire_form(reg, TAB, ctx.additions.samplers)
    prompt_tools.wire(ctx, reg, TAB)

    def txt2img(request: gr.Request, progress=gr.Progress(), **values: Any) -> Iterator[tuple]:
        """Generate images from a prompt.

        Parameters: prompt, negative_prompt, sampler (A1111 name, e.g. "Euler a"), schedule
        ("Automatic", "Karras", ...), steps, cfg_scale, width, height (multiples of 8), seed (-1:
        random), batch_count, batch_size, checkpoint (label, name, title or hash; empty: the
        default checkpoint), vae ("Automatic", "None" or a VAE name).
        Hires fix (A1111 names): enable_hr, hr_scale, hr_upscaler ("Latent", "Lanczos", a model...),
        hr_second_pass_steps, hr_resize_x/y, hr_checkpoint, hr_sampler, hr_prompt, hr_negative_prompt,
        denoising_strength; SDXL refiner: refiner_checkpoint, refiner_switch_at.
        Prompt tools: styles (names from data/styles.csv, applied in order), clip_skip (1..12), emphasis ("Original" or "No norm"),
        wildcard_mode ("random" or "combinatorial": how {a|b} and __name__ wildcards fill a batch),
        tiling (A1111 "Tiling": a seamless image that wraps around),
        subseed (variation seed, -1: random) and subseed_strength (0..1: how far toward its noise).
        Returns the gallery images (PNG files with A1111 infotext) and a JSON object with the
        request, the seeds, the infotexts and the saved paths.
        """
        try:
            generation = txt2img_request(values, ctx.additions)
        except ValueError as exc:
            raise user_error(exc) from exc
        yield from stream_job(ctx.jobs, generation, owner_of(request), progress)

    wire_generate_buttons(ctx, reg, TAB, control_tab.optional_images(ctx, txt2img),
                          TXT2IMG_FIELDS + control_tab.fields(ctx), MODEL_FIELDS, api_name="txt2img")
