"""gradio_client against the real server: images, infotext in the saved PNG, determinism per
seed, short errors that leave the server serving, PNG Info on the saved file."""
import re
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.metadata import read_infotext

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "a lighthouse at dusk, (calm sea:1.1)"
BASE = dict(prompt=PROMPT, negative_prompt="fog", sampler="Euler a", schedule="Automatic", steps=3,
            cfg_scale=5, width=128, height=64, seed=1234, batch_count=1, batch_size=1,
            checkpoint="tiny.safetensors", vae="Automatic")


def txt2img(client, **changes):
    gallery, info = client.predict(**{**BASE, **changes}, api_name="/txt2img")
    return gallery, info


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def first(client):
    return txt2img(client)


def test_txt2img_returns_the_image_and_saves_it_with_infotext(server, first):
    gallery, info = first
    assert len(gallery) == 1 and info["seeds"] == [1234]
    with Image.open(gallery[0]["image"]) as returned:
        assert returned.size == (128, 64)
    saved = Path(info["paths"][0])
    relative = saved.relative_to(server.data_dir / "outputs" / "txt2img-images")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{5}-1234\.png", relative.as_posix())
    assert date.fromisoformat(relative.parts[0]) in (date.today(), date.today() - timedelta(days=1))
    with Image.open(saved) as image:
        text = read_infotext(image)
    assert text == info["infotexts"][0]
    assert text.startswith(PROMPT + "\nNegative prompt: fog\nSteps: 3, Sampler: Euler a,")
    for part in ("Seed: 1234", "Size: 128x64", "Model: tiny", "Model hash: ", "CFG scale: 5"):
        assert part in text
    # What the client downloaded is the saved file: same pixels, infotext kept.
    assert np.array_equal(pixels(gallery[0]["image"]), pixels(saved))
    with Image.open(gallery[0]["image"]) as returned:
        assert read_infotext(returned) == text


def test_same_seed_gives_identical_pixels_and_another_seed_does_not(client, first):
    _gallery, info = first
    _again, info_again = txt2img(client)
    assert info_again["paths"][0] != info["paths"][0]  # a new numbered file
    assert np.array_equal(pixels(info_again["paths"][0]), pixels(info["paths"][0]))
    _other, info_other = txt2img(client, seed=1235)
    assert not np.array_equal(pixels(info_other["paths"][0]), pixels(info["paths"][0]))


def test_batches_use_consecutive_seeds(client, first):
    gallery, info = txt2img(client, batch_count=2, batch_size=2, seed=1234, steps=1)
    assert len(gallery) == 4 and info["seeds"] == [1234, 1235, 1236, 1237]
    assert len({pixels(path).tobytes() for path in info["paths"]}) == 4


def test_bad_input_gives_a_short_error_and_the_server_keeps_serving(client, first):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as raised:
        txt2img(client, width=100)
    assert str(raised.value) == "width must be a multiple of 8 between 64 and 4096, got 100"
    with pytest.raises(AppError, match="^Checkpoint 'no-such-model' not found"):
        txt2img(client, checkpoint="no-such-model")
    with pytest.raises(AppError) as raised:
        txt2img(client, checkpoint="truncated.safetensors")
    message = str(raised.value)
    assert "truncated.safetensors" in message and "\n" not in message and len(message) < 400
    # The next good call works and still gives the same pixels as before.
    _gallery, info = txt2img(client)
    assert np.array_equal(pixels(info["paths"][0]), pixels(first[1]["paths"][0]))


def test_png_info_reads_the_saved_image(client, first):
    from gradio_client import handle_file

    _gallery, info = first
    infotext, parsed = client.predict(image=handle_file(info["paths"][0]), api_name="/png_info")
    assert infotext == info["infotexts"][0]
    assert (parsed["Prompt"], parsed["Negative prompt"]) == (PROMPT, "fog")
    assert (parsed["Steps"], parsed["Seed"], parsed["Size-1"], parsed["Size-2"]) == ("3", "1234", "128", "64")
    assert (parsed["Sampler"], parsed["Model"]) == ("Euler a", "tiny")


def test_img2img_uses_the_init_image(client, first):
    from gradio_client import handle_file

    def img2img(init: str):
        return client.predict(**BASE, mode="img2img", init_image=handle_file(init), denoising_strength=0.0,
                              resize_mode="just resize", api_name="/img2img")

    _same_seed, other = txt2img(client, seed=99)
    gallery, info = img2img(first[1]["paths"][0])
    _gallery, info_other = img2img(other["paths"][0])
    assert len(gallery) == 1 and "Denoising strength: 0" in info["infotexts"][0]
    assert Path(info["paths"][0]).parent.parent.name == "img2img-images"
    with Image.open(info["paths"][0]) as image:
        assert image.size == (128, 64) and read_infotext(image) == info["infotexts"][0]
    # Strength 0 only round-trips through the VAE: another init image gives another result.
    assert not np.array_equal(pixels(info["paths"][0]), pixels(info_other["paths"][0]))
