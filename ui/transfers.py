"""Cross-tab "Send to ..." buttons, wired after every tab exists."""
from __future__ import annotations

from typing import Any, Mapping

import gradio as gr
from PIL import Image

from ui.components import ComponentRegistry
from ui.context import AppContext

# Form field -> infotext key (A1111 parse_generation_parameters names).
INFOTEXT_KEYS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps",
                 "sampler": "Sampler", "schedule": "Schedule type", "cfg_scale": "CFG scale",
                 "seed": "Seed", "width": "Size-1", "height": "Size-2", "styles": "Styles array",
                 "clip_skip": "Clip skip", "emphasis": "Emphasis", "tiling": "Tiling",
                 "subseed": "Variation seed", "subseed_strength": "Variation seed strength"}
FORM_FIELDS = tuple(INFOTEXT_KEYS)
# img2img has no variation seed controls (the engine mixes txt2img noise only)
IMG2IMG_FORM_FIELDS = tuple(f for f in FORM_FIELDS if f not in ("subseed", "subseed_strength"))
_NUMBERS = {"steps": int, "seed": int, "width": int, "height": int, "cfg_scale": float, "clip_skip": int,
            "subseed": int, "subseed_strength": float}
# Values written only when not the default (A1111 too): absent means the default, not "keep the form's".
_ABSENT_MEANS = {"subseed_strength": 0.0}
# Flags written only when on (A1111 too): an infotext without one means off, not "keep the form's".
_FLAGS = ("tiling",)


def fields_from_infotext(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed infotext -> form values; keys that are missing or unreadable are left out."""
    values = {}
    for field, key in INFOTEXT_KEYS.items():
        if field in _FLAGS:
            values[field] = parsed.get(key) in (True, "True")
            continue
        if key not in parsed or parsed[key] in (None, ""):
            if field in _ABSENT_MEANS:
                values[field] = _ABSENT_MEANS[field]
            continue
        value = parsed[key]
        if field in _NUMBERS:
            try:
                value = _NUMBERS[field](float(value))
            except (TypeError, ValueError):
                continue
        values[field] = value
    return values


def fields_from_generation(info: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The generation info of one gallery image -> form values (its own seed)."""
    values = {field: info[field] for field in FORM_FIELDS if field in info}
    seeds = info.get("seeds") or []
    if seeds:
        values["seed"] = seeds[index] if 0 <= index < len(seeds) else seeds[0]
    subseeds = info.get("subseeds") or []
    if subseeds:
        values["subseed"] = subseeds[index] if 0 <= index < len(subseeds) else subseeds[0]
    return values


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    private = dict(api_visibility="private", queue=False)
    img2img_fields = reg.many(*(f"img2img.{f}" for f in IMG2IMG_FORM_FIELDS))
    txt2img_fields = reg.many(*(f"txt2img.{f}" for f in FORM_FIELDS))

    def send_to_img2img(gallery: list | None, selected: int | None, info: Any):
        if not gallery:
            raise gr.Error("Nothing to send: generate an image first", print_exception=False)
        index = selected if selected is not None and 0 <= selected < len(gallery) else 0
        item = gallery[index]
        path = item[0] if isinstance(item, (tuple, list)) else item
        with Image.open(path) as image:
            init_image = image.convert("RGB")
        values = fields_from_generation(info, index) if isinstance(info, dict) else {}
        return ([init_image, "img2img", gr.Tabs(selected="img2img"), gr.Tabs(selected="img2img_source")]
                + [values.get(field, gr.skip()) for field in IMG2IMG_FORM_FIELDS])

    reg["txt2img.send_to_img2img"].click(
        send_to_img2img, inputs=reg.many("txt2img.gallery", "txt2img.selected", "txt2img.generation_info"),
        outputs=reg.many("img2img.init_image", "img2img.mode", "tabs", "img2img.source_tabs") + img2img_fields,
        **private)

    def send_to_txt2img(parsed: Any):
        if not isinstance(parsed, dict) or not parsed:
            raise gr.Error("No parameters to send: upload an image with generation parameters",
                           print_exception=False)
        values = fields_from_infotext(parsed)
        return [gr.Tabs(selected="txt2img")] + [values.get(field, gr.skip()) for field in FORM_FIELDS]

    reg["png_info.send_to_txt2img"].click(
        send_to_txt2img, inputs=[reg["png_info.parsed"]], outputs=[reg["tabs"]] + txt2img_fields, **private)
