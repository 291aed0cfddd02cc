"""The ControlNet accordion of the txt2img and img2img tabs: `control_net_unit_count` units
(settings), each with a Control Type (All / ControlNet / T2I-Adapter / IP-Adapter: filters the
model list by kind), input image, preprocessor and its thresholds, model (only those that fit
the selected checkpoint), weight, guidance range, control mode, resize mode, pixel perfect, and
a Preview button that shows the detected map. Components are registered as `<tab>.cnN_<field>`,
so the tab's Generate handler receives them by name (ui/control_form.py builds the units).
The GLIGEN accordion takes boxes typed as text or drawn on a canvas ("Use the drawn boxes")."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import gradio as gr

from pipelines.control import CONTROL_MODES, RESIZE_MODES, preprocessors
from pipelines.control.apply import pixel_perfect_resolution
from pipelines.control.gligen import boxes_from_strokes, gligen_files
from pipelines.control.ip_adapter import ip_adapter_entry, ip_adapter_files
from pipelines.control.models import family_of_arch, family_of_entry, model_kind
from pipelines.control.units import NO_MODEL, UNIT_TYPE_KINDS, UNIT_TYPES, unit_type_name, units_from_infotext
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.control_form import (IMAGE_NOT_RESTORED, UNIT_FIELDS, boxes_text, control_fields, field_name,
                             form_from_units, stroke_mask)
from ui.errors import user_error
from ui.guarded_images import guard_uploads

TABS = ("txt2img", "img2img")
_PRIVATE = dict(api_visibility="private", queue=False)
PREVIEW_API_NAME = "controlnet_preview"  # the public Preview endpoint (gradio_client)


def unit_count(ctx: AppContext) -> int:
    return int(getattr(ctx.settings, "control_net_unit_count", 3))


GLIGEN_FIELDS = ("gligen_model", "gligen_boxes")


def fields(ctx: AppContext) -> tuple[str, ...]:
    """The tab form fields the Generate handler takes for the units (and GLIGEN)."""
    return control_fields(unit_count(ctx)) + GLIGEN_FIELDS


def optional_images(ctx: AppContext, handler: Callable) -> Callable:
    """The generation handler with `cnN_image=None` keyword parameters in its signature: Gradio
    marks an API parameter optional only when its component has a value or the function a None
    default, and the units' images start empty."""
    signature = inspect.signature(handler)
    params = list(signature.parameters.values())
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    images = [inspect.Parameter(field_name(i, "image"), inspect.Parameter.KEYWORD_ONLY, default=None)
              for i in range(unit_count(ctx)) if field_name(i, "image") not in signature.parameters]

    @functools.wraps(handler)
    def with_optional_images(*args: Any, **kwargs: Any):
        yield from handler(*args, **kwargs)

    with_optional_images.__signature__ = signature.replace(parameters=rest + images + var_keyword)
    return with_optional_images


def model_choices(ctx: AppContext, checkpoint: str | None, unit_type: str = "All") -> list[str]:
    """"None" and the ControlNets that fit the checkpoint's base model (unknown ones too: a
    .pth cannot be probed without loading it; loading checks again), only those of the kind
    `unit_type` names (UNIT_TYPES; "All": every kind but image encoders)."""
    wanted_kind = UNIT_TYPE_KINDS.get(unit_type_name(unit_type))
    wanted = None
    try:
        entry = ctx.registry.find("checkpoint", checkpoint) if checkpoint else ctx.registry.default_checkpoint()
        wanted = family_of_arch(entry.arch) if entry is not None else None
    except ValueError:
        pass
    names = []
    entries = list(ctx.registry.controlnets())
    models_dir = ctx.registry.paths.models_dir
    entries += [e for e in (ip_adapter_entry(models_dir, n) for n in ip_adapter_files(models_dir)) if e]
    for entry in entries:
        try:
            kind = model_kind(entry)
            if kind == "image_encoder" or wanted_kind not in (None, kind):
                continue
            family = family_of_entry(entry)
        except (OSError, ValueError):
            continue
        if family is None or wanted is None or family == wanted:
            names.append(entry.name)
    return [NO_MODEL] + names


def preview_map(models_dir, source, module: str, resolution: float, pixel_perfect: bool, resize_mode: str,
                threshold_a: float, threshold_b: float, width: float, height: float,
                table: preprocessors.PreprocessorTable | None = None):
    """What the Preview button shows: the detected map at the resolution generation will use
    (`table`: the extensions' preprocessors, `ctx.additions.preprocessors`)."""
    if source is None:
        raise ValueError("upload a control image first (in img2img, or an init image)")
    if pixel_perfect:
        resolution = pixel_perfect_resolution(source, int(width), int(height), resize_mode)
    return preprocessors.detect(module, source, resolution=int(resolution), threshold_a=float(threshold_a),
                                threshold_b=float(threshold_b), models_dir=models_dir, table=table)


def _slider_update(slider: preprocessors.Slider | None) -> Any:
    if slider is None:
        return gr.update(visible=False, value=-1)
    return gr.update(visible=True, label=slider.label, minimum=slider.minimum, maximum=slider.maximum,
                     step=slider.step, value=slider.default)


def build(ctx: AppContext, reg: ComponentRegistry, tab: str) -> None:
    """The accordion; call inside the tab's settings column."""
    choices = model_choices(ctx, reg["checkpoint"].value if "checkpoint" in reg else None)
    with gr.Accordion("ControlNet", open=False, elem_id=f"{tab}_controlnet"):
        with gr.Tabs():
            for index in range(unit_count(ctx)):
                with gr.Tab(f"ControlNet Unit {index}"):
                    _unit(reg, tab, index, choices, ctx.settings.max_upload_pixels,
                          preprocessors.names(ctx.additions.preprocessors))
    for index in range(unit_count(ctx)):
        _wire_unit(ctx, reg, tab, index)
    with gr.Accordion("GLIGEN", open=False, elem_id=f"{tab}_gligen"):
        with gr.Row():
            reg.add(f"{tab}.gligen_model", gr.Dropdown(
                [""] + gligen_files(ctx.registry.paths.models_dir), value="", label="GLIGEN model (models/gligen)",
                allow_custom_value=True))
            refresh = gr.Button("↻", size="sm", min_width=40, scale=0)
        reg.add(f"{tab}.gligen_boxes", gr.Textbox(
            "", lines=3, label="Boxes: one per line, 'phrase: x0, y0, x1, y1' (fractions of the image, 0-1)",
            placeholder="a red square: 0.1, 0.1, 0.5, 0.5"))
        with gr.Accordion("Draw the boxes", open=False):
            # The canvas stands for the whole image: each separate stroke group is one box.
            reg.add(f"{tab}.gligen_canvas", gr.ImageEditor(
                type="numpy", label="Draw one outline or blob per object", canvas_size=(512, 512), height=320,
                sources=["upload", "clipboard"], layers=False, brush=gr.Brush(default_size=6, colors=["#ff3030"])))
            reg.add(f"{tab}.gligen_phrases", gr.Textbox(
                "", lines=2, label="Phrases of the drawn boxes, one per line (top to bottom, then left to right)"))
            reg.add(f"{tab}.gligen_from_drawing", gr.Button("Use the drawn boxes", size="sm"))
    refresh.click(lambda: gr.update(choices=[""] + gligen_files(ctx.registry.paths.models_dir)),
                  outputs=[reg[f"{tab}.gligen_model"]], **_PRIVATE)

    def use_drawing(canvas: Any, phrases: str | None) -> str:
        """The Boxes text for the strokes on the canvas, replacing what was there."""
        try:
            return boxes_text(boxes_from_strokes(stroke_mask(canvas), (phrases or "").splitlines()))
        except ValueError as exc:
            raise user_error(exc) from exc

    reg[f"{tab}.gligen_from_drawing"].click(use_drawing, inputs=[reg[f"{tab}.gligen_canvas"],
                                                                 reg[f"{tab}.gligen_phrases"]],
                                            outputs=[reg[f"{tab}.gligen_boxes"]], **_PRIVATE)


def _unit(reg: ComponentRegistry, tab: str, index: int, choices: list[str], max_pixels: int,
          modules: list[str]) -> None:
    def add(field: str, component):
        return reg.add(f"{tab}.{field_name(index, field)}", component)

    with gr.Row():
        # Checked from the file header before Gradio decodes it (bombs, non-images), as img2img's.
        add("image", guard_uploads(gr.Image(type="pil", label="Control image (empty in img2img: the img2img image)",
                                            sources=["upload", "clipboard"], height=240), max_pixels))
        # PNG: the map comes back lossless (Gradio's default webp would blur the edges of a canny map).
        reg.add(f"{tab}.cn{index}_preview_image", gr.Image(type="pil", label="Detected map", interactive=False,
                                                           height=240, format="png"))
    add("type", gr.Radio(list(UNIT_TYPES), value=UNIT_TYPES[0], label="Control Type"))
    with gr.Row():
        add("enabled", gr.Checkbox(False, label="Enable"))
        add("pixel_perfect", gr.Checkbox(False, label="Pixel perfect"))
        reg.add(f"{tab}.cn{index}_preview", gr.Button("Preview", size="sm"))
    with gr.Row():
        add("module", gr.Dropdown(modules, value="none", label="Preprocessor"))
        add("model", gr.Dropdown(choices, value=NO_MODEL, label="Model", allow_custom_value=True))
        reg.add(f"{tab}.cn{index}_refresh", gr.Button("↻", size="sm", min_width=40, scale=0))
    with gr.Row():
        add("weight", gr.Slider(0, 2, value=1, step=0.05, label="Control weight"))
        add("guidance_start", gr.Slider(0, 1, value=0, step=0.01, label="Starting control step"))
        add("guidance_end", gr.Slider(0, 1, value=1, step=0.01, label="Ending control step"))
    with gr.Row():
        add("processor_res", gr.Slider(64, 2048, value=512, step=8, label="Preprocessor resolution"))
        add("threshold_a", gr.Slider(-1, 255, value=-1, label="Threshold A", visible=False))
        add("threshold_b", gr.Slider(-1, 255, value=-1, label="Threshold B", visible=False))
    add("control_mode", gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode"))
    add("resize_mode", gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[1], label="Resize mode"))


def _wire_unit(ctx: AppContext, reg: ComponentRegistry, tab: str, index: int) -> None:
    def comp(field: str):
        return reg[f"{tab}.{field_name(index, field)}"]

    def on_module(name: str):
        try:
            processor = preprocessors.get(name, ctx.additions.preprocessors)
        except ValueError:
            return gr.skip(), gr.skip()
        return _slider_update(processor.threshold_a), _slider_update(processor.threshold_b)

    # .input, not .change: restoring a unit from infotext sets the module without resetting thresholds.
    comp("module").input(on_module, inputs=[comp("module")], outputs=[comp("threshold_a"), comp("threshold_b")],
                          **_PRIVATE)

    def preview(image=None, module="none", resolution=512, pixel_perfect=False, resize_mode=RESIZE_MODES[1],
                threshold_a=-1, threshold_b=-1, width=512, height=512, init_image=None):
        """The ControlNet preprocessor's detected map of `image`, as generation will use it.

        Parameters: image, module (a preprocessor name, e.g. "canny"), resolution (short side;
        ignored when pixel_perfect, which derives it from width/height and resize_mode),
        threshold_a, threshold_b (-1: the preprocessor's defaults). Returns the map image.
        """
        try:
            return preview_map(ctx.registry.paths.models_dir, image if image is not None else init_image, module,
                               resolution, pixel_perfect, resize_mode, threshold_a, threshold_b, width, height,
                               ctx.additions.preprocessors)
        except ValueError as exc:
            raise user_error(exc) from exc

    inputs = [comp("image"), comp("module"), comp("processor_res"), comp("pixel_perfect"), comp("resize_mode"),
              comp("threshold_a"), comp("threshold_b"), reg[f"{tab}.width"], reg[f"{tab}.height"]]
    if f"{tab}.init_image" in reg:
        inputs.append(reg[f"{tab}.init_image"])
    # One public endpoint (txt2img, unit 0) for scripts; the other Preview buttons do the same privately.
    public = dict(api_name=PREVIEW_API_NAME, queue=False) if (tab, index) == ("txt2img", 0) else _PRIVATE
    reg[f"{tab}.cn{index}_preview"].click(preview, inputs=inputs, outputs=[reg[f"{tab}.cn{index}_preview_image"]],
                                          **public)

    def refresh(checkpoint: str | None, current: str | None, unit_type: str = UNIT_TYPES[0]):
        ctx.registry.refresh()
        return refilter(checkpoint, current, unit_type)

    def refilter(checkpoint: str | None, current: str | None, unit_type: str = UNIT_TYPES[0]):
        """The model list for the checkpoint and the unit's Control Type (the choice kept if it fits)."""
        choices = model_choices(ctx, checkpoint, unit_type)
        return gr.update(choices=choices, value=current if current in choices else NO_MODEL)

    filter_inputs = [reg["checkpoint"], comp("model"), comp("type")]
    reg[f"{tab}.cn{index}_refresh"].click(refresh, inputs=filter_inputs, outputs=[comp("model")], **_PRIVATE)
    reg["checkpoint"].change(refilter, inputs=filter_inputs, outputs=[comp("model")], **_PRIVATE)
    comp("type").input(refilter, inputs=filter_inputs, outputs=[comp("model")], **_PRIVATE)


def wire_paste(ctx: AppContext, reg: ComponentRegistry) -> None:
    """PNG info's "Send to txt2img" also restores the ControlNet units of the infotext."""
    if "png_info.send_to_txt2img" not in reg or "png_info.parsed" not in reg:
        return
    count = unit_count(ctx)
    targets = [reg[f"txt2img.{name}"] for name in control_fields(count) if not name.endswith("_image")]
    names = [name for name in control_fields(count) if not name.endswith("_image")]

    def restore(parsed: Any):
        units = units_from_infotext(parsed) if isinstance(parsed, dict) else []
        if not units:
            return [gr.skip()] * len(targets)
        gr.Info(IMAGE_NOT_RESTORED)
        values = form_from_units(units, count)
        return [values.get(name, gr.skip()) for name in names]

    reg["png_info.send_to_txt2img"].click(restore, inputs=[reg["png_info.parsed"]], outputs=targets, **_PRIVATE)


__all__ = ["build", "fields", "wire_paste", "model_choices", "UNIT_FIELDS"]
