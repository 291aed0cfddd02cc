"""Hires fix on tiny-world: the target size, the first pass is a plain txt2img, denoise 0 gives the
upscaled first pass, a model upscaler and a second checkpoint work, and the infotext has A1111's keys."""
import numpy as np
import pytest
from PIL import Image

from pipelines import hires
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests import factories
from tests.integration.conftest import make_engine
from tests.upscaler_factory import write_tiny_esrgan

BASE = dict(prompt="a red square on a blue background", width=64, height=64, steps=4, cfg_scale=5, seed=11,
            sampler="Euler", save_images=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires")
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "other.safetensors", seed=3)
    write_tiny_esrgan(root / "models" / "ESRGAN" / "2x-tiny.pth", scale=2, old_layout=True)
    factories.write_tiny_lora(root / "models" / "Lora" / "tl.safetensors", seed=2)
    builtin_dir = Settings(data_dir=root / "data").paths().builtin_dir
    manager, _ = make_engine(root, root / "data", builtin_dir=builtin_dir)
    return manager


def tinyworld(**changes) -> GenerationRequest:
    return GenerationRequest(checkpoint="tinyworld", **{**BASE, **changes})


def test_denoise_zero_is_the_upscaled_plain_txt2img(engine):
    plain = generate(engine, None, tinyworld()).images[0]
    result = generate(engine, None, tinyworld(enable_hr=True, hr_upscaler="Lanczos", hr_scale=1.5,
                                              denoising_strength=0.0))
    image = result.images[0]
    assert image.size == (96, 96)
    assert image.tobytes() == plain.resize((96, 96), Image.LANCZOS).tobytes()
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Size-1"]) == ("1.5", "Lanczos", "64")
    assert fields["Denoising strength"] == "0"


def test_second_pass_reaches_the_target_size_and_changes_the_image(engine):
    request = tinyworld(enable_hr=True, hr_upscaler="Latent", hr_resize_x=96, hr_resize_y=0,
                        hr_second_pass_steps=2, denoising_strength=0.6)
    result = generate(engine, None, request)
    image = result.images[0]
    assert image.size == (96, 96)
    upscaled = generate(engine, None, tinyworld()).images[0].resize((96, 96), Image.LANCZOS)
    difference = np.abs(np.asarray(image, float) - np.asarray(upscaled, float)).mean()
    assert 1 < difference < 80  # redrawn, but from the first pass
    assert generate(engine, None, request).images[0].tobytes() == image.tobytes()
    fields = parse_infotext(result.infotexts[0])
    assert str(fields["Hires resize-1"]) == "96" and str(fields["Hires steps"]) == "2" and fields["Hires upscaler"] == "Latent"


def test_model_upscaler_checkpoint_sampler_and_prompt(engine):
    request = tinyworld(enable_hr=True, hr_upscaler="2x-tiny", hr_scale=2, denoising_strength=0.0)
    assert generate(engine, None, request).images[0].size == (128, 128)
    request = tinyworld(enable_hr=True, hr_upscaler="Nearest", hr_scale=2, denoising_strength=0.5,
                        hr_checkpoint="other", hr_sampler="DPM++ 2M", hr_prompt="a green circle",
                        hr_second_pass_steps=2)
    result = generate(engine, None, request)
    fields = parse_infotext(result.infotexts[0])
    assert fields["Hires checkpoint"] == "other" and fields["Hires sampler"] == "DPM++ 2M"
    assert fields["Hires prompt"] == "a green circle"
    assert result.images[0].size == (128, 128)
    # the first-pass model is active again afterwards
    assert engine.snapshot()["checkpoint"].startswith("tiny-world")


def test_bad_hires_settings_are_refused():
    with pytest.raises(ValueError, match="hires upscale"):
        GenerationRequest(enable_hr=True, hr_scale=20)
    with pytest.raises(ValueError, match="larger than"):
        GenerationRequest(enable_hr=True, width=1024, height=1024, hr_scale=8)
    with pytest.raises(ValueError, match="hires sampler"):
        GenerationRequest(enable_hr=True, hr_sampler="no such sampler")
    request = GenerationRequest(enable_hr=True, width=128, height=96, hr_resize_x=256)
    assert hires.target_size(request) == (256, 192)
    again = GenerationRequest.from_dict(request.to_dict())
    assert again == request and again.hr_resize_x == 256


def test_hires_prompt_uses_the_prompt_language(engine):
    """The hires pass encodes with A1111 syntax: `(text:1.0)` is `text`, not parentheses and digits."""
    common = dict(enable_hr=True, hr_upscaler="Nearest", hr_scale=1.5, denoising_strength=0.6, hr_second_pass_steps=2)
    weighted = generate(engine, None, tinyworld(hr_prompt="(a green circle:1.0)", **common)).images[0]
    plain = generate(engine, None, tinyworld(hr_prompt="a green circle", **common)).images[0]
    other = generate(engine, None, tinyworld(hr_prompt="(a green circle:1.6)", **common)).images[0]
    assert weighted.tobytes() == plain.tobytes()
    assert weighted.tobytes() != other.tobytes()


def test_a_hires_checkpoint_leaves_the_first_pass_model_and_its_lora_for_the_next_batch(engine):
    common = dict(prompt=BASE["prompt"] + " <lora:tl:1>", enable_hr=True, hr_upscaler="Nearest", hr_scale=1.5,
                  denoising_strength=0.5, hr_second_pass_steps=2, hr_checkpoint="other")
    two = generate(engine, None, tinyworld(batch_count=2, **common))
    second_alone = generate(engine, None, tinyworld(seed=BASE["seed"] + 1, **common))
    assert two.seeds == [BASE["seed"], BASE["seed"] + 1]
    assert two.images[1].tobytes() == second_alone.images[0].tobytes()
    without_lora = generate(engine, None, tinyworld(seed=BASE["seed"] + 1, **{**common, "prompt": BASE["prompt"]}))
    assert without_lora.images[0].tobytes() != second_alone.images[0].tobytes()
