"""img2img tab with an Inpaint sub-tab (mask drawn in the browser or uploaded). Its Generate
button is the public `img2img` API endpoint; `mode` says img2img or inpaint."""
from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from pipelines.request import RESIZE_MODES
from ui import control_tab, forms, prompt_tools
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.errors import user_error
from ui.extension_slots import extension_accordions
from ui.generation import owner_of, stream_job, wire_generate_buttons
from ui.guarded_images import guard_uploads
from ui.request_builder import IMG2IMG_FIELDS, IMG2IMG_MODES, INPAINT_AREAS, MODEL_FIELDS, img2img_request
from ui.topbar import preset_for_checkpoint

TAB = "img2img"


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    preset = preset_for_checkpoint(ctx, reg["checkpoint"].value)
    with gr.Tab("img2img", id=TAB):
        forms.prompt_area(reg, TAB)
        prompt_tools.build(ctx, reg, TAB)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                _source_images(reg, ctx.settings.max_upload_pixels)
                reg.add(f"{TAB}.resize_mode", gr.Radio(
                    [(mode.capitalize(), mode) for mode in RESIZE_MODES], value=RESIZE_MODES[0],
                    label="Resize mode", elem_id="img2img_resize_mode"))
                forms.sampling_controls(reg, TAB, preset, ctx.additions.samplers)
                reg.add(f"{TAB}.denoising_strength", gr.Slider(
                    0, 1, value=0.75, step=0.01, label="Denoising strength", elem_id="img2img_denoising_strength"))
                extension_accordions(ctx, reg, TAB)
                control_tab.build(ctx, reg, TAB)
            with gr.Column(scale=1):
                forms.results_panel(reg, TAB, {})
    forms.wire_form(reg, TAB, ctx.additions.samplers)
    prompt_tools.wire(ctx, reg, TAB)
    _wire_generate(ctx, reg)


def _source_images(reg: ComponentRegistry, max_pixels: int) -> None:
    # Which sub-tab is open decides the task; the hidden radio carries it (and API callers set it).
    reg.add(f"{TAB}.mode", gr.Radio(list(IMG2IMG_MODES), value="img2img", label="Mode", visible=False))
    with gr.Tabs(selected="img2img_source") as source_tabs:
        reg.add(f"{TAB}.source_tabs", source_tabs)
        with gr.Tab("img2img", id="img2img_source") as img2img_tab:
            reg.add(f"{TAB}.init_image", guard_uploads(gr.Image(
                label="Image for img2img", type="pil", image_mode="RGB", format="png", height=420,
                sources=["upload", "clipboard"], elem_id="img2img_init_image"), max_pixels))
            reg.add(f"{TAB}.send_to_inpaint", gr.Button("Send to inpaint", size="sm", elem_id="img2img_send_to_inpaint"))
        with gr.Tab("Inpaint", id="inpaint_source") as inpaint_tab:
            reg.add(f"{TAB}.inpaint_image", guard_uploads(gr.ImageEditor(
                # RGBA: painted layers keep their alpha, which is what the mask is made of.
                label="Paint the area to change", type="pil", image_mode="RGBA", format="png", height=420,
                sources=["upload", "clipboard"], transforms=(), layers=False,
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=16),
                elem_id="img2img_inpaint_editor"), max_pixels))
            with gr.Accordion("Upload a mask instead (white = change)", open=False):
                reg.add(f"{TAB}.mask", guard_uploads(gr.Image(label="Mask", type="pil", image_mode="L", format="png",
                                                sources=["upload", "clipboard"], elem_id="img2img_mask"), max_pixels))
            with gr.Row():
                reg.add(f"{TAB}.mask_blur", gr.Slider(0, 64, value=4, step=1, label="Mask blur",
                                                      elem_id="img2img_mask_blur"))
                reg.add(f"{TAB}.inpainting_mask_invert", gr.Checkbox(
                    False, label="Invert mask (change what is not painted)", elem_id="img2img_mask_invert"))
            reg.add(f"{TAB}.inpainting_fill", gr.Radio(
                [("Fill", "fill"), ("Original", "original")], value="original", label="Masked content",
                elem_id="img2img_inpainting_fill"))
            with gr.Row():
                reg.add(f"{TAB}.inpaint_area", gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0],
                                                        label="Inpaint area", elem_id="img2img_inpaint_area"))
                reg.add(f"{TAB}.inpaint_full_res_padding", gr.Slider(
                    0, 256, value=32, step=4, label="Only masked padding, pixels", elem_id="img2img_padding"))
    private = dict(api_visibility="private", queue=False)

    def send_to_inpaint(image):
        if image is None:
            raise gr.Error("Nothing to send: upload an image first", print_exception=False)
        return ({"background": image, "layers": [], "composite": image}, "inpaint",
                gr.Tabs(selected="inpaint_source"))

    reg[f"{TAB}.send_to_inpaint"].click(
        send_to_inpaint, inputs=[reg[f"{TAB}.init_image"]],
        outputs=[reg[f"{TAB}.inpaint_image"], reg[f"{TAB}.mode"], source_tabs], **private)
    img2img_tab.select(lambda: "img2img", outputs=[reg[f"{TAB}.mode"]], **private)
    inpaint_tab.select(lambda: "inpaint", outputs=[reg[f"{TAB}.mode"]], **private)


def _wire_generate(ctx: AppContext, reg: ComponentRegistry) -> None:
    # The images are keyword parameters with a None default so that API callers may leave them out.
    def img2img(request: gr.Request, progress=gr.Progress(), *, init_image=None, inpaint_image=None,
                mask=None, **values: Any) -> Iterator[tuple]:
        """Change an image (mode "img2img") or part of it (mode "inpaint").

        Parameters: mode, init_image, inpaint_image (an ImageEditor value: background + painted
        layers), mask (white = change; overrides the painted layers), denoising_strength,
        resize_mode ("just resize", "crop and resize", "resize and fill"), mask_blur,
        inpainting_fill ("fill", "original"), inpaint_area ("Whole picture", "Only masked"),
        inpaint_full_res_padding, inpainting_mask_invert, and the txt2img parameters (tiling included).
        Returns the gallery images and the generation info JSON.
        """
        values.update(init_image=init_image, inpaint_image=inpaint_image, mask=mask)
        try:
            generation = img2img_request(values, ctx.additions)
        except ValueError as exc:
            raise user_error(exc) from exc
        yield from stream_job(ctx.jobs, generation, owner_of(request), progress)

    wire_generate_buttons(ctx, reg, TAB, control_tab.optional_images(ctx, img2img),
                          IMG2IMG_FIELDS + control_tab.fields(ctx), MODEL_FIELDS, api_name="img2img")
