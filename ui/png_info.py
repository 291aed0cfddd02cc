"""PNG Info tab: read the A1111 infotext of any PNG/JPEG/WebP (public `png_info` endpoint)."""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from pipelines.adapters.paste import restore_renamed
from pipelines.metadata import parse_infotext, read_infotext
from pipelines.uploads import check_image_file
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.errors import user_error
from ui.guarded_images import guard_uploads

TAB = "png_info"
NO_PARAMETERS = "No generation parameters found in this image."


def image_info(path: str | None, styles: Any = None, registry: Any = None) -> tuple[str, dict[str, Any]]:
    """(infotext, parsed fields) of the image file at `path`; ("", {}) for no image. With a
    StyleStore, styles found in the prompts are taken back out and listed as "Styles array";
    with the registry, LoRAs / embeddings / hypernetworks renamed since are found by their hashes."""
    if not path:
        return "", {}
    check_image_file(path)  # header only: non-images and decompression bombs are refused here
    try:
        with Image.open(path) as image:
            image.load()
            text = read_infotext(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError("this file is not a readable PNG, JPEG or WebP image") from exc
    if not text:
        return NO_PARAMETERS, {}
    parsed = parse_infotext(text)
    if registry is not None:
        parsed = restore_renamed(registry, parsed)
    if styles is not None:
        found, prompt, negative = styles.extract(parsed["Prompt"], parsed["Negative prompt"])
        if found:
            parsed.update({"Prompt": prompt, "Negative prompt": negative, "Styles array": found})
    return text, parsed


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    with gr.Tab("PNG Info", id=TAB):
        with gr.Row(equal_height=False):
            with gr.Column():
                reg.add(f"{TAB}.image", guard_uploads(gr.Image(label="Source", type="filepath", image_mode=None,
                                                 sources=["upload", "clipboard"], height=420,
                                                 elem_id="png_info_image"), ctx.settings.max_upload_pixels))
            with gr.Column():
                reg.add(f"{TAB}.infotext", gr.Textbox(label="Parameters", lines=6, interactive=False,
                                                      buttons=["copy"], elem_id="png_info_infotext"))
                reg.add(f"{TAB}.parsed", gr.JSON(label="Parsed fields", elem_id="png_info_parsed"))
                reg.add(f"{TAB}.send_to_txt2img", gr.Button("Send to txt2img", elem_id="png_info_send_to_txt2img"))

    def png_info(image: str | None) -> tuple[str, dict[str, Any]]:
        """Read the generation parameters of an image.

        Parameter: image (a PNG, JPEG or WebP file). Returns the infotext as written by A1111 or
        Easel and its parsed fields (Prompt, Negative prompt, Steps, Sampler, Size-1, ...).
        """
        try:
            return image_info(image, ctx.prompts.styles if ctx.prompts is not None else None, ctx.registry)
        except ValueError as exc:
            raise user_error(exc) from exc

    # `upload`, not `change`: only a user action (or an API call) reads a file.
    image = reg[f"{TAB}.image"]
    outputs = reg.many(f"{TAB}.infotext", f"{TAB}.parsed")
    image.upload(png_info, inputs_kwargs={"image": image}, outputs=outputs, api_name="png_info")
    image.clear(lambda: ("", {}), outputs=outputs, api_visibility="private", queue=False)
