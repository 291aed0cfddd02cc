"""The ControlNet units through the real UI handlers: an in-process Gradio server on loopback,
gradio_client calling /txt2img and /img2img with the unit fields by name (`cn0_model`, ...),
a ControlNet made by the test from the checkpoint's own UNet."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

import app
from pipelines.metadata import parse_infotext
from pipelines.settings import Settings
from tests import factories
from tests.control_factories import (tiny_controlnet, tiny_t2i_adapter, write_controlnet, write_t2i_adapter,
                                     write_tiny_gligen, write_tiny_ip_adapter)
from tests.e2e.conftest import free_port
from ui import control_tab
from ui.control_form import form_from_units
from pipelines.control import units_from_infotext

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = dict(prompt="a square", negative_prompt="", sampler="Euler a", schedule="Automatic", steps=3,
            cfg_scale=5, width=64, height=64, seed=7, batch_count=1, batch_size=1,
            checkpoint="tiny.safetensors", vae="Automatic")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    data_dir = tmp_path_factory.mktemp("cn-ui")
    factories.write_tiny_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    write_controlnet(data_dir / "models" / "ControlNet" / "control_tiny_canny.safetensors",
                     tiny_controlnet(factories.tiny_unet(seed=0), seed=4))
    write_tiny_ip_adapter(data_dir / "models", factories.tiny_unet(seed=0))
    write_tiny_gligen(data_dir / "models", factories.tiny_unet(seed=0),
                      factories.tiny_text_encoder(seed=0).config.hidden_size)
    write_t2i_adapter(data_dir / "models" / "ControlNet" / "t2iadapter_tiny.safetensors",
                      tiny_t2i_adapter(factories.tiny_unet(seed=0), seed=3))
    drawn = Image.new("RGB", (64, 64))
    ImageDraw.Draw(drawn).ellipse((12, 12, 51, 51), fill="white")
    drawn.save(data_dir / "control.png")
    blocks, ctx = app.build_app(Settings(data_dir=data_dir, device="cpu"))
    port = free_port()
    blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), data_dir, ctx
    finally:
        blocks.close()


def generate(client, api_name="/txt2img", **changes):
    gallery, info = client.predict(**{**BASE, **changes}, api_name=api_name)
    with Image.open(gallery[0]["image"]) as image:
        return np.asarray(image.convert("RGB")).astype(float), info["infotexts"][0]


def unit(data_dir, **changes):
    from gradio_client import handle_file

    return {"cn0_enabled": True, "cn0_model": "control_tiny_canny.safetensors", "cn0_module": "canny",
            "cn0_image": handle_file(data_dir / "control.png"), **changes}


def test_txt2img_unit_changes_the_image_and_weight_zero_does_not(served):
    client, data_dir, _ctx = served
    off, _ = generate(client)
    on, infotext = generate(client, **unit(data_dir))
    zero, _ = generate(client, **unit(data_dir, cn0_weight=0))
    assert np.abs(on - off).mean() > 1
    assert np.array_equal(zero, off)
    assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny [' in infotext
    # pasting the infotext restores the unit's settings (not its image)
    restored = units_from_infotext(parse_infotext(infotext))
    values = form_from_units(restored, 3)
    assert values["cn0_enabled"] and values["cn0_module"] == "canny" and values["cn1_enabled"] is False
    assert "cn0_image" not in values


def test_img2img_unit_uses_the_init_image_when_it_has_none(served):
    from gradio_client import handle_file

    client, data_dir, _ctx = served
    img2img = dict(api_name="/img2img", mode="img2img", init_image=handle_file(data_dir / "control.png"),
                   denoising_strength=0.9)
    off, _ = generate(client, **img2img)
    on, infotext = generate(client, **img2img, **unit(data_dir, cn0_image=None))
    assert np.abs(on - off).mean() > 1 and "ControlNet 0" in infotext


def test_a_unit_without_image_in_txt2img_is_a_short_error(served):
    client, data_dir, _ctx = served
    with pytest.raises(Exception, match="has no input image"):
        generate(client, **unit(data_dir, cn0_image=None))


def test_ip_adapter_unit_through_the_ui(served):
    from gradio_client import handle_file

    client, data_dir, ctx = served
    choices = control_tab.model_choices(ctx, "tiny.safetensors")
    assert "ip-adapter_tiny.safetensors" in choices and not any("image_encoder" in c for c in choices)
    off, _ = generate(client)
    on, infotext = generate(client, cn1_enabled=True, cn1_model="ip-adapter_tiny.safetensors",
                            cn1_image=handle_file(data_dir / "control.png"))
    assert np.abs(on - off).mean() > 1
    assert 'ControlNet 0: "Module: none, Model: ip-adapter_tiny [' in infotext


def test_t2i_adapter_unit_through_the_ui(served):
    client, data_dir, _ctx = served
    off, _ = generate(client)
    on, infotext = generate(client, **unit(data_dir, cn0_model="t2iadapter_tiny.safetensors"))
    assert np.abs(on - off).mean() > 1
    assert 'ControlNet 0: "Module: canny, Model: t2iadapter_tiny [' in infotext


def test_gligen_boxes_through_the_ui(served):
    client, _data_dir, _ctx = served
    off, _ = generate(client)
    on, infotext = generate(client, gligen_model="gligen_tiny.safetensors",
                            gligen_boxes="a square: 0.1, 0.1, 0.6, 0.6")
    assert np.abs(on - off).mean() > 0.5
    assert "GLIGEN boxes: a square 0.1 0.1 0.6 0.6" in infotext
    with pytest.raises(Exception, match="phrase: x0, y0, x1, y1"):
        generate(client, gligen_model="gligen_tiny.safetensors", gligen_boxes="a square")
