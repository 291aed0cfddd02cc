"""gradio_client against the real server: hires fix in /txt2img, /extras_single_image on a saved
generation, and /merge_checkpoints whose result is listed and generates without a restart."""
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = dict(prompt="a lighthouse", negative_prompt="", sampler="Euler", schedule="Automatic", steps=2,
            cfg_scale=5, width=64, height=64, seed=77, batch_count=1, batch_size=1,
            checkpoint="tiny.safetensors", vae="Automatic")


def first_path(gallery) -> str:
    item = gallery[0]
    return item["image"] if isinstance(item, dict) and "image" in item else item


def test_hires_fix_through_the_api(client):
    _gallery, plain = client.predict(**BASE, api_name="/txt2img")
    _gallery, info = client.predict(**BASE, enable_hr=True, hr_upscaler="Lanczos", hr_scale=2,
                                    denoising_strength=0.0, api_name="/txt2img")
    with Image.open(info["paths"][0]) as hires, Image.open(plain["paths"][0]) as low:
        assert hires.size == (128, 128)
        expected = low.convert("RGB").resize((128, 128), Image.LANCZOS)
        assert np.array_equal(np.asarray(hires.convert("RGB")), np.asarray(expected))
    assert "Hires upscale: 2, Hires upscaler: Lanczos" in info["infotexts"][0]


def test_extras_upscales_and_keeps_the_parameters(client):
    _gallery, info = client.predict(**BASE, api_name="/txt2img")
    gallery, text = client.predict(image=handle_file(info["paths"][0]), resize_mode="by", upscaling_resize=2,
                                   upscaler_1="Nearest", api_name="/extras_single_image")
    assert text == "Postprocess upscale by: 2, Postprocess upscaler: Nearest"
    with Image.open(first_path(gallery)) as image:
        image.load()
        assert image.size == (128, 128)
        assert image.info["parameters"] == info["infotexts"][0]


def test_merge_then_generate_with_the_new_checkpoint(client, server):
    message, *_lists = client.predict(primary="tiny.safetensors", secondary="tiny.safetensors", multiplier=0.5,
                                      precision="fp32", output_name="tiny-self-merge",
                                      api_name="/merge_checkpoints")
    assert message == "Saved tiny-self-merge.safetensors"
    assert (server.data_dir / "models" / "Stable-diffusion" / "tiny-self-merge.safetensors").is_file()
    _gallery, merged = client.predict(**{**BASE, "checkpoint": "tiny-self-merge"}, api_name="/txt2img")
    _gallery, original = client.predict(**BASE, api_name="/txt2img")
    # A merged with itself is A: the same image, loaded through the normal single-file path
    assert Path(merged["paths"][0]).read_bytes() != b""
    with Image.open(merged["paths"][0]) as a, Image.open(original["paths"][0]) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    with pytest.raises(Exception, match="plain file name|without folders"):
        client.predict(primary="tiny.safetensors", output_name="../../evil", api_name="/merge_checkpoints")
