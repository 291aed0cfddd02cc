"""Extras tab: upscale one image, uploaded files, or a folder inside the data dir, with one
upscaler or a blend of two. Public endpoints `extras_single_image`, `extras_batch_images` and
`extras_batch_directory`; results are saved to outputs/extras-images with the source's
generation parameters kept."""
from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines import extras, upscalers
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.errors import user_error
from ui.guarded_images import guard_uploads

TAB = "extras"
OPTION_FIELDS = ("resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop",
                 "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility")


def upscaler_tool(ctx: AppContext) -> upscalers.Upscalers:
    # under the manager's device lock: a model upscale waits for the running generation
    return upscalers.Upscalers.for_manager(ctx.manager)


def options_from_values(values: dict[str, Any]) -> extras.ExtrasOptions:
    defaults = extras.ExtrasOptions()
    given = {k: values[k] for k in OPTION_FIELDS if values.get(k) is not None}
    for name in ("upscaling_resize_w", "upscaling_resize_h"):
        if name in given:
            given[name] = int(given[name])
    for name in ("upscaling_resize", "extras_upscaler_2_visibility"):
        if name in given:
            given[name] = float(given[name])
    return extras.ExtrasOptions(**{**defaults.__dict__, **given})


def run_images(ctx: AppContext, images, values: dict[str, Any]) -> tuple[list[str], str]:
    """Upscale and save each image; (saved paths, postprocessing text of the last one)."""
    options = options_from_values(values)
    tool = upscaler_tool(ctx)
    paths, text = [], ""
    for image in images:
        _result, text, path = extras.process_one(tool, ctx.outputs, image, options)
        paths.append(str(path))
    return paths, text


def _limits(ctx: AppContext) -> dict[str, int]:
    """The upload limits from the settings, for files read by open_images."""
    return {"max_pixels": ctx.settings.max_upload_pixels, "max_bytes": int(ctx.settings.max_upload_mb * (1 << 20))}


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    names = upscalers.upscaler_names(ctx.registry.paths.models_dir)
    p = f"{TAB}."
    with gr.Tab("Extras", id=TAB):
        with gr.Row(equal_height=False):
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Single Image"):
                        # Header checked before Gradio opens it: bombs and non-images get a short error.
                        reg.add(p + "image", guard_uploads(gr.Image(label="Source", type="filepath", image_mode=None,
                                                                    sources=["upload", "clipboard"],
                                                                    elem_id="extras_image"),
                                                           ctx.settings.max_upload_pixels))
                        reg.add(p + "run_single", gr.Button("Upscale", variant="primary", elem_id="extras_run"))
                    with gr.Tab("Batch Process"):
                        reg.add(p + "files", gr.File(label="Images", file_count="multiple", file_types=["image"]))
                        reg.add(p + "run_batch", gr.Button("Upscale all", variant="primary"))
                    with gr.Tab("Batch from Directory"):
                        reg.add(p + "input_dir", gr.Textbox("", label="Input folder (inside the data folder)"))
                        reg.add(p + "run_dir", gr.Button("Upscale folder", variant="primary"))
                with gr.Row():
                    reg.add(p + "resize_mode", gr.Radio([extras.RESIZE_BY, extras.RESIZE_TO], value=extras.RESIZE_BY,
                                                        label="Resize (by a factor / to a size)"))
                    reg.add(p + "upscaling_resize", gr.Slider(1, 8, value=2, step=0.05, label="Resize by"))
                with gr.Row():
                    reg.add(p + "upscaling_resize_w", gr.Number(512, precision=0, label="Width"))
                    reg.add(p + "upscaling_resize_h", gr.Number(512, precision=0, label="Height"))
                    reg.add(p + "upscaling_crop", gr.Checkbox(True, label="Crop to fit"))
                with gr.Row():
                    reg.add(p + "upscaler_1", gr.Dropdown(names, value=upscalers.LANCZOS, label="Upscaler 1"))
                    reg.add(p + "upscaler_2", gr.Dropdown(names, value=upscalers.NONE, label="Upscaler 2"))
                    reg.add(p + "extras_upscaler_2_visibility", gr.Slider(0, 1, value=0, step=0.01,
                                                                          label="Upscaler 2 visibility"))
            with gr.Column():
                reg.add(p + "gallery", gr.Gallery(label="Result", columns=2, height=520, format="png",
                                                  interactive=False, type="filepath", elem_id="extras_gallery"))
                reg.add(p + "info", gr.Textbox("", label="Postprocessing", interactive=False, elem_id="extras_info"))

    options = reg.keyword_inputs(OPTION_FIELDS, prefix=p)
    outputs = reg.many(p + "gallery", p + "info")
    device = dict(concurrency_id="device", concurrency_limit=1)

    def extras_single_image(image: str | None = None, **values: Any):
        """Upscale one image (a file). Options (A1111 names): resize_mode ("by"/"to"), upscaling_resize,
        upscaling_resize_w/h, upscaling_crop, upscaler_1, upscaler_2, extras_upscaler_2_visibility.
        Returns the saved image (generation parameters kept) and the postprocessing text."""
        try:
            if not image:
                raise ValueError("upload an image first")
            return run_images(ctx, extras.open_images([image], **_limits(ctx)), values)
        except ValueError as exc:
            raise user_error(exc) from exc

    def extras_batch_images(files: list | None = None, **values: Any):
        """Upscale uploaded image files with the same options as extras_single_image."""
        try:
            if not files:
                raise ValueError("upload one or more images first")
            if len(files) > extras.MAX_BATCH:
                raise ValueError(f"at most {extras.MAX_BATCH} images per batch")
            paths = [getattr(f, "name", f) for f in files]
            return run_images(ctx, extras.open_images(paths, **_limits(ctx)), values)
        except ValueError as exc:
            raise user_error(exc) from exc

    def extras_batch_directory(input_dir: str = "", **values: Any):
        """Upscale every image in a folder inside the data folder (same options)."""
        try:
            paths = extras.batch_folder_images(input_dir, ctx.settings.data_dir)
            return run_images(ctx, extras.open_images(paths, **_limits(ctx)), values)
        except ValueError as exc:
            raise user_error(exc) from exc

    reg[p + "run_single"].click(extras_single_image, inputs_kwargs={"image": reg[p + "image"], **options},
                                outputs=outputs, api_name="extras_single_image", **device)
    reg[p + "run_batch"].click(extras_batch_images, inputs_kwargs={"files": reg[p + "files"], **options},
                               outputs=outputs, api_name="extras_batch_images", **device)
    reg[p + "run_dir"].click(extras_batch_directory, inputs_kwargs={"input_dir": reg[p + "input_dir"], **options},
                             outputs=outputs, api_name="extras_batch_directory", **device)
