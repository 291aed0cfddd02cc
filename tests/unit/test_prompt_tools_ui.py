"""The prompt tools of the txt2img and img2img tabs through the built UI: the handlers Gradio
registered for the token counters, the styles editor and "Send to txt2img" are called as the
browser would trigger them, and their outputs, data/styles.csv and the dropdown choices are
compared. Nothing is loaded onto a device."""
from pathlib import Path

import pytest
from PIL import Image

import app
from pipelines.metadata import image_bytes_with_infotext
from pipelines.settings import Settings

STYLES_CSV = ('name,prompt,negative_prompt\n'
              '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
              'Warm,"warm light, golden hour",\n')
# 54 one-token words, a comma 21 tokens before the 75-token limit, then 25 more: 80 tokens
LONG = " ".join(["cat"] * 54) + ", " + " ".join(["dog"] * 25)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from ui.layout import build_ui

    data = tmp_path_factory.mktemp("data")
    (data / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    ctx = app.build_context(Settings(data_dir=data, sdxl_clip_l_skip=True))
    blocks, reg = build_ui(ctx)
    return blocks, reg, ctx, data


def _handler(blocks, component, event, name=None):
    """The one function Gradio runs for `event` of `component` (named `name` when several do)."""
    found = [fn for fn in blocks.fns.values() if (component._id, event) in [tuple(t) for t in fn.targets]
             and (name is None or fn.fn.__name__ == name)]
    assert len(found) == 1, f"{len(found)} handlers for {event}"
    return found[0]


def _by_output(fn, values):
    return {block._id: value for block, value in zip(fn.outputs, values)}


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
@pytest.mark.parametrize("box", ["prompt", "negative_prompt"])
def test_token_counter_recounts_when_the_box_changes(ui, tab, box):
    blocks, reg, _ctx, _data = ui
    fn = _handler(blocks, reg[f"{tab}.{box}"], "change")
    assert [b._id for b in fn.outputs] == [reg[f"{tab}.{box}_tokens"]._id]
    assert [b._id for b in fn.inputs][0] == reg[f"{tab}.{box}"]._id
    assert ">2/75<" in fn.fn("a cat", 20)
    assert ">80/150<" in fn.fn(LONG, 20)  # hard cut at 75 (no comma within 20 tokens): 75 + 5
    assert ">0/75<" in fn.fn("", 20)
    assert ">5/75<" in fn.fn("[a:a very big fluffy cat:0.5] <lora:x:1>", 20)  # longest edit, tag not counted
    assert ">0/75<" in fn.fn("(x:1.2.3)", 20)  # an unreadable weight counts nothing instead of failing


def test_styles_editor_saves_loads_deletes_and_refreshes(ui):
    blocks, reg, ctx, data = ui
    tab = "txt2img"
    picker, name = reg[f"{tab}.styles"], reg[f"{tab}.style_name"]
    csv_file = data / "styles.csv"
    save = _handler(blocks, reg[f"{tab}.style_save"], "click")
    delete = _handler(blocks, reg[f"{tab}.style_delete"], "click")
    refresh = _handler(blocks, reg[f"{tab}.styles_refresh"], "click")
    load = _handler(blocks, name, "change")
    assert [b._id for b in save.outputs] == [b._id for b in delete.outputs] == [picker._id, name._id]

    # save a new style: written to styles.csv in A1111's format, offered in both dropdowns
    out = _by_output(save, save.fn(" Night ", "{prompt} at night, stars", "daylight", ["Warm", "Cinematic"]))
    assert csv_file.read_text(encoding="utf-8").splitlines() == [
        "name,prompt,negative_prompt", "Cinematic,\"cinematic still of {prompt}, film grain\",\"cartoon, drawing\"",
        "Warm,\"warm light, golden hour\",", "Night,\"{prompt} at night, stars\",daylight"]
    assert out[picker._id]["choices"] == out[name._id]["choices"] == ["Cinematic", "Warm", "Night"]
    assert out[picker._id]["value"] == ["Warm", "Cinematic"]  # the selection is kept
    assert ctx.prompts.styles.apply(["Night"], "a fox", "") == ("a fox at night, stars", "daylight")

    # picking a name loads its text into the editor; an unknown name leaves the boxes alone
    assert load.fn("Night") == ("{prompt} at night, stars", "daylight")
    assert load.fn("not saved") == ({"__type__": "update"},) * 2  # gr.skip(): the boxes stay as they are

    # saving an existing name replaces it in place
    save.fn("Warm", "warmer", "cold", [])
    assert [line.split(",")[0] for line in csv_file.read_text().splitlines()[1:]] == ["Cinematic", "Warm", "Night"]
    assert load.fn("Warm") == ("warmer", "cold")

    # delete: gone from the file and the choices, dropped from the selection, the name box cleared
    out = _by_output(delete, delete.fn("Warm", ["Warm", "Night"]))
    assert "Warm" not in csv_file.read_text() and ctx.prompts.styles.names() == ["Cinematic", "Night"]
    assert out[picker._id]["choices"] == ["Cinematic", "Night"] and out[picker._id]["value"] == ["Night"]
    assert out[name._id]["value"] is None

    # refresh after a hand edit of the file
    csv_file.write_text(STYLES_CSV.replace("Warm,", "Sunny,"), encoding="utf-8")
    out = _by_output(refresh, refresh.fn(["Night", "Sunny"]))
    assert out[picker._id]["choices"] == out[name._id]["choices"] == ["Cinematic", "Sunny"]
    assert out[picker._id]["value"] == ["Sunny"]

    # errors are short messages, the file untouched
    import gradio as gr

    before = csv_file.read_text()
    with pytest.raises(gr.Error, match="needs a name"):
        save.fn("  ", "x", "", [])
    with pytest.raises(gr.Error, match="unknown style: Nope"):
        delete.fn("Nope", [])
    assert csv_file.read_text() == before
    csv_file.write_text(STYLES_CSV, encoding="utf-8")  # as the other tests expect it


def test_send_to_txt2img_restores_the_styles_of_a_styled_infotext(ui, tmp_path):
    blocks, reg, ctx, _data = ui
    styled, negative = ctx.prompts.styles.apply(["Cinematic", "Warm"], "a fox", "blurry")
    infotext = f"{styled}\nNegative prompt: {negative}\nSteps: 12, Sampler: Euler, CFG scale: 6, Seed: 5, Size: 64x64"
    path = tmp_path / "styled.png"
    path.write_bytes(image_bytes_with_infotext(Image.new("RGB", (8, 8)), infotext, "png"))

    png_info = [fn for fn in blocks.fns.values() if fn.api_name == "png_info"][0]
    text, parsed = png_info.fn(image=str(path))
    assert text == infotext and parsed["Styles array"] == ["Cinematic", "Warm"]
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("a fox", "blurry")

    send = _handler(blocks, reg["png_info.send_to_txt2img"], "click", name="send_to_txt2img")
    out = _by_output(send, send.fn(parsed))
    assert out[reg["txt2img.styles"]._id] == ["Cinematic", "Warm"]
    assert out[reg["txt2img.prompt"]._id] == "a fox" and out[reg["txt2img.negative_prompt"]._id] == "blurry"
    assert out[reg["txt2img.steps"]._id] == 12
    # the restored form gives back the same prompt text the image was made from
    assert ctx.prompts.styles.apply(out[reg["txt2img.styles"]._id], "a fox", "blurry") == (styled, negative)


def test_the_sdxl_clip_l_skip_setting_reaches_the_prompt_source(ui, tmp_path):
    _blocks, _reg, ctx, _data = ui
    assert ctx.prompts.sdxl_clip_l_skip is True
    assert Settings().sdxl_clip_l_skip is False  # A1111's default: clip skip ignored on SDXL
    (tmp_path / "config.json").write_text('{"sdxl_clip_l_skip": true}')
    assert Settings.from_sources(["--data-dir", str(tmp_path)], {}).sdxl_clip_l_skip is True
    assert Settings.from_sources([], {"EASEL_SDXL_CLIP_L_SKIP": "1"}).sdxl_clip_l_skip is True
