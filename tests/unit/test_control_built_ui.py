"""The ControlNet and GLIGEN accordions through the built UI (five units): the handlers Gradio
registered for Control Type, Preview, "Use the drawn boxes" and PNG Info's "Send to txt2img" are
called as the browser would trigger them, and their outputs are compared. Nothing runs on a device."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import app
from pipelines.control import ControlUnit
from pipelines.control.gligen import boxes_from_strokes
from pipelines.control.units import normalize_gligen_boxes
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests import factories
from ui.control_form import IMAGE_NOT_RESTORED, units_from_form

CN_KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from ui.layout import build_ui

    data = tmp_path_factory.mktemp("cn-built")
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    folder = data / "models" / "ControlNet"
    folder.mkdir(parents=True)
    save_file({CN_KEY: torch.zeros(2, 64)}, str(folder / "tiny_canny.safetensors"))
    save_file({"adapter.conv_in.weight": torch.zeros(2, 48, 3, 3), "adapter.body.0.in_conv.weight": torch.zeros(1)},
              str(folder / "t2iadapter_tiny.safetensors"))
    save_file({"image_proj.proj.weight": torch.zeros(256, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 64)},
              str(folder / "ip-adapter_tiny.safetensors"))
    ctx = app.build_context(Settings(data_dir=data, control_net_unit_count=5))
    blocks, reg = build_ui(ctx)
    return blocks, reg, ctx


def handler(blocks, component, event, name=None):
    """The one function Gradio runs for `event` of `component` (named `name` when several do)."""
    found = [fn for fn in blocks.fns.values() if (component._id, event) in [tuple(t) for t in fn.targets]
             and (name is None or fn.fn.__name__ == name)]
    assert len(found) == 1, f"{len(found)} handlers for {event}"
    return found[0]


def ids(components) -> list[int]:
    return [c._id for c in components]


def by_output(fn, values) -> dict[int, object]:
    return {block._id: value for block, value in zip(fn.outputs, values)}


def test_five_units_in_both_tabs(ui):
    _blocks, reg, _ctx = ui
    for tab in ("txt2img", "img2img"):
        for field in ("enabled", "type", "image", "model", "weight"):
            assert f"{tab}.cn4_{field}" in reg
        assert f"{tab}.cn5_enabled" not in reg
    units = units_from_form({f"cn{i}_enabled": i == 4 for i in range(5)} | {"cn4_model": "tiny_canny"})
    assert [u.model for u in units] == ["tiny_canny"]


@pytest.mark.parametrize("unit_type, expected", [
    ("All", ["None", "ip-adapter_tiny.safetensors", "t2iadapter_tiny.safetensors", "tiny_canny.safetensors"]),
    ("ControlNet", ["None", "tiny_canny.safetensors"]),
    ("T2I-Adapter", ["None", "t2iadapter_tiny.safetensors"]),
    ("IP-Adapter", ["None", "ip-adapter_tiny.safetensors"]),
])
def test_control_type_filters_the_model_list(ui, unit_type, expected):
    blocks, reg, _ctx = ui
    fn = handler(blocks, reg["txt2img.cn2_type"], "input")
    assert ids(fn.inputs) == ids([reg["checkpoint"], reg["txt2img.cn2_model"], reg["txt2img.cn2_type"]])
    assert ids(fn.outputs) == ids([reg["txt2img.cn2_model"]])
    update = fn.fn("tiny.safetensors", "tiny_canny.safetensors", unit_type)
    assert update["choices"] == expected
    assert update["value"] == ("tiny_canny.safetensors" if "tiny_canny.safetensors" in expected else "None")


def test_the_form_and_the_request_carry_the_type():
    (unit,) = units_from_form({"cn0_enabled": True, "cn0_type": "IP-Adapter", "cn0_model": "ip-adapter_tiny"})
    assert unit.unit_type == "IP-Adapter"
    request = GenerationRequest(prompt="p", control_units=(unit,))
    data = request.to_dict()
    assert data["control_units"][0]["unit_type"] == "IP-Adapter"
    assert GenerationRequest.from_dict(data).control_units[0].unit_type == "IP-Adapter"
    assert ControlUnit(unit_type="t2i adapter").unit_type == "T2I-Adapter"
    with pytest.raises(ValueError, match="unit type must be one of All, ControlNet"):
        ControlUnit(unit_type="LoRA")


def square(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((16, 16, size - 17, size - 17), fill="white")
    return image


def test_preview_buttons_show_the_map_and_img2img_falls_back_to_its_image(ui):
    blocks, reg, _ctx = ui
    names = ("image", "module", "processor_res", "pixel_perfect", "resize_mode", "threshold_a", "threshold_b")
    txt = handler(blocks, reg["txt2img.cn1_preview"], "click")
    assert ids(txt.inputs) == ids([reg[f"txt2img.cn1_{n}"] for n in names] + [reg["txt2img.width"],
                                                                             reg["txt2img.height"]])
    assert ids(txt.outputs) == ids([reg["txt2img.cn1_preview_image"]])
    edges = np.asarray(txt.fn(square(), "canny", 64, False, "Crop and Resize", -1, -1, 64, 64).convert("L"))
    assert edges[16:48, 15:18].any() and not edges[24:40, 24:40].any()
    with pytest.raises(Exception, match="upload a control image"):
        txt.fn(None, "canny", 64, False, "Crop and Resize", -1, -1, 64, 64)
    img = handler(blocks, reg["img2img.cn0_preview"], "click")
    assert ids(img.inputs)[-1] == reg["img2img.init_image"]._id  # the img2img image stands in
    fallback = img.fn(None, "invert", 64, False, "Crop and Resize", -1, -1, 64, 64, square())
    assert np.array_equal(np.asarray(fallback), 255 - np.asarray(square()))
    own = img.fn(Image.new("RGB", (64, 64)), "invert", 64, False, "Crop and Resize", -1, -1, 64, 64, square())
    assert np.asarray(own).min() == 255  # the unit's own image wins over the img2img one


def test_png_info_paste_restores_the_units_and_says_the_image_is_not(ui, monkeypatch):
    import gradio as gr

    blocks, reg, _ctx = ui
    shown = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: shown.append(message))
    fn = handler(blocks, reg["png_info.send_to_txt2img"], "click", name="restore")
    parsed = {"Steps": "20",
              "ControlNet 0": "Module: canny, Model: tiny_canny [0123abcd], Weight: 0.5, Resize Mode: Just Resize, "
                              "Processor Res: 256, Threshold A: 50, Threshold B: 150, Guidance Start: 0.1, "
                              "Guidance End: 0.9, Pixel Perfect: True, Control Mode: ControlNet is more important",
              "ControlNet 1": "Module: none, Model: ip-adapter_tiny [89abcdef], Weight: 0.7"}
    values = by_output(fn, fn.fn(parsed))
    field = lambda index, name: values[reg[f"txt2img.cn{index}_{name}"]._id]  # noqa: E731
    assert field(0, "enabled") is True and field(0, "module") == "canny"
    assert field(0, "model") == "tiny_canny [0123abcd]" and field(0, "weight") == 0.5
    assert field(0, "resize_mode") == "Just Resize" and field(0, "processor_res") == 256
    assert (field(0, "threshold_a"), field(0, "threshold_b")) == (50, 150)
    assert (field(0, "guidance_start"), field(0, "guidance_end"), field(0, "pixel_perfect")) == (0.1, 0.9, True)
    assert field(0, "control_mode") == "ControlNet is more important"
    assert field(1, "enabled") is True and field(1, "model") == "ip-adapter_tiny [89abcdef]"
    assert all(field(i, "enabled") is False for i in (2, 3, 4))
    assert reg["txt2img.cn0_image"]._id not in values  # images cannot be restored ...
    assert shown == [IMAGE_NOT_RESTORED]  # ... and the user is told so
    shown.clear()
    untouched = fn.fn({"Steps": "20"})
    assert all(v == gr.skip() for v in untouched) and shown == []


# --- GLIGEN boxes drawn on a canvas -------------------------------------------------------------

def canvas(width=200, height=100) -> tuple[dict, np.ndarray]:
    """An ImageEditor value: a hand-drawn outline with a one-pixel gap (x 20-59, y 10-49), a
    filled blob (x 120-179, y 50-89) and a 1-pixel speck, on a transparent layer."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle((20, 10, 59, 49), outline=(255, 48, 48, 255), width=2)
    draw.line((40, 10, 40, 11), fill=(0, 0, 0, 0))  # the gap
    draw.rectangle((120, 50, 179, 89), fill=(255, 48, 48, 255))
    draw.point((190, 5), fill=(255, 48, 48, 255))
    background = np.zeros((height, width, 4), np.uint8)
    return {"background": background, "layers": [np.asarray(layer)], "composite": None}, np.asarray(layer)


def test_strokes_become_boxes_in_reading_order():
    _value, layer = canvas()
    boxes = boxes_from_strokes(layer[..., 3] > 0, ["a cat", "a dog"])
    assert boxes == (("a cat", 0.1, 0.1, 0.3, 0.5), ("a dog", 0.6, 0.5, 0.9, 0.9))
    with pytest.raises(ValueError, match=r"2 box\(es\) drawn but 1 phrase"):
        boxes_from_strokes(layer[..., 3] > 0, ["a cat"])
    with pytest.raises(ValueError, match="draw at least one box"):
        boxes_from_strokes(np.zeros((10, 10), bool), [])


def test_use_the_drawn_boxes_fills_the_boxes_text(ui):
    blocks, reg, _ctx = ui
    fn = handler(blocks, reg["img2img.gligen_from_drawing"], "click")
    assert ids(fn.inputs) == ids([reg["img2img.gligen_canvas"], reg["img2img.gligen_phrases"]])
    assert ids(fn.outputs) == ids([reg["img2img.gligen_boxes"]])
    value, _layer = canvas()
    text = fn.fn(value, "a cat\n\na dog\n")
    assert text == "a cat: 0.1, 0.1, 0.3, 0.5\na dog: 0.6, 0.5, 0.9, 0.9"
    assert normalize_gligen_boxes(text) == (("a cat", 0.1, 0.1, 0.3, 0.5), ("a dog", 0.6, 0.5, 0.9, 0.9))
    with pytest.raises(Exception, match="draw at least one box"):
        fn.fn({"background": None, "layers": [], "composite": None}, "a cat")
