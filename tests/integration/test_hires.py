"""Hires fix on tiny-world: the target size, the first pass is a plain txt2img, denoise 0 gives the
upscaled first pass (the model-upscaled one for a model upscaler), a second checkpoint and the
hires negative prompt work, and the infotext has A1111's keys."""
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from pipelines import hires, upscalers
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests import factories
from tests.integration.conftest import make_engine
from tests.upscaler_factory import write_tiny_esrgan

BASE = dict(prompt="a red square on a blue background", width=64, height=64, steps=12, cfg_scale=5, seed=11,
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
    # A1111 writes the requested size as given: a 0 (keep the aspect ratio) stays 0
    assert "Hires resize: 96x0," in result.infotexts[0]
    assert (str(fields["Hires resize-1"]), str(fields["Hires resize-2"])) == ("96", "0")
    assert str(fields["Hires steps"]) == "2" and fields["Hires upscaler"] == "Latent"


def test_model_upscaler_checkpoint_sampler_and_prompt(engine):
    request = tinyworld(enable_hr=True, hr_upscaler="2x-tiny", hr_scale=2, denoising_strength=0.0)
    assert generate(engine, None, request).images[0].size == (128, 128)
    request = tinyworld(enable_hr=True, hr_upscaler="Nearest", hr_scale=2, denoising_strength=0.5,
                        hr_checkpoint="other", hr_sampler="DPM++ 2M", hr_prompt="a green circle",
                        hr_negative_prompt="blurry", hr_second_pass_steps=2)
    result = generate(engine, None, request)
    fields = parse_infotext(result.infotexts[0])
    shorthash = engine.registry.shorthash(engine.registry.find("checkpoint", "other"))
    assert fields["Hires checkpoint"] == f"other [{shorthash}]"  # A1111's short title, like "Refiner"
    assert engine.registry.find("checkpoint", fields["Hires checkpoint"]).name == "other.safetensors"
    assert fields["Hires sampler"] == "DPM++ 2M"
    assert fields["Hires prompt"] == "a green circle" and fields["Hires negative prompt"] == "blurry"
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


def test_latent_hires_at_denoise_zero_is_the_decoded_upscaled_first_pass_latents(engine):
    """The first pass's latents, caught where the plain txt2img decodes them, upscaled here with
    torch (A1111's "Latent": bilinear, no antialias) and decoded: the hires result at denoise 0."""
    import torch
    from torch.nn import functional as F

    from pipelines import generate as generate_module

    caught = []
    real_decode = generate_module.decode_latents

    def catching(vae, latents):
        caught.append(latents.clone())
        return real_decode(vae, latents)

    with mock.patch.object(generate_module, "decode_latents", catching):
        generate(engine, None, tinyworld())
    [first_pass] = caught
    assert first_pass.shape[-2:] == (16, 16)  # 64x64 pixels, VAE factor 4
    with engine.pipeline("txt2img", "tinyworld") as active, torch.no_grad():
        expected = real_decode(active.pipe.vae, F.interpolate(first_pass, size=(24, 24), mode="bilinear",
                                                              antialias=False))[0]
    image = generate(engine, None, tinyworld(enable_hr=True, hr_upscaler="Latent", hr_scale=1.5,
                                             denoising_strength=0.0)).images[0]
    assert image.size == (96, 96)
    assert image.tobytes() == expected.tobytes()
    nearest = generate(engine, None, tinyworld(enable_hr=True, hr_upscaler="Latent (nearest)", hr_scale=1.5,
                                               denoising_strength=0.0)).images[0]
    assert nearest.tobytes() != image.tobytes()  # the mode is used: the check can fail


HIRES = dict(enable_hr=True, hr_upscaler="Nearest", hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=2)


def test_hires_checkpoint_changes_the_image(engine):
    same = generate(engine, None, tinyworld(**HIRES)).images[0]
    named_same = generate(engine, None, tinyworld(hr_checkpoint=hires.SAME_CHECKPOINT, **HIRES)).images[0]
    first_by_name = generate(engine, None, tinyworld(hr_checkpoint="tinyworld", **HIRES)).images[0]
    other = generate(engine, None, tinyworld(hr_checkpoint="other", **HIRES)).images[0]
    assert named_same.tobytes() == same.tobytes()
    assert first_by_name.tobytes() == same.tobytes()  # the first-pass model by name: the same picture
    assert np.abs(np.asarray(other, float) - np.asarray(same, float)).mean() > 1


def test_hires_sampler_changes_the_image(engine):
    same = generate(engine, None, tinyworld(**HIRES)).images[0]
    named_same = generate(engine, None, tinyworld(hr_sampler="Euler", **HIRES)).images[0]
    other = generate(engine, None, tinyworld(hr_sampler="DPM++ 2M", **HIRES)).images[0]
    assert named_same.tobytes() == same.tobytes()
    assert np.abs(np.asarray(other, float) - np.asarray(same, float)).mean() > 0.5


@pytest.mark.parametrize("steps, strength", [(20, 0.7), (2, 0.6), (1, 0.3)])
def test_hires_steps_are_the_steps_sampled(engine, steps, strength):
    """A1111's "Hires steps" count the steps the second pass samples, whatever the denoise
    (diffusers samples int(total * strength) of a total-step schedule)."""
    calls = []
    with engine.pipeline("txt2img", "tinyworld") as active:
        unet = active.pipe.unet
    handle = unet.register_forward_hook(lambda *_: calls.append(1))
    events = []
    try:
        generate(engine, None, tinyworld(steps=1, enable_hr=True, hr_upscaler="Nearest", hr_scale=1.5,
                                         denoising_strength=strength, hr_second_pass_steps=steps),
                 progress=events.append)
    finally:
        handle.remove()
    assert len(calls) == 1 + steps  # one first-pass step, then exactly the hires steps
    assert len(events) == 1 + steps


def test_no_live_preview_after_the_last_step_of_a_pass(engine, monkeypatch):
    """Previews every 2 steps, but none after a pass's last step (its image is decoded next):
    4 first-pass steps preview at step 2 only; a 3-step hires pass adds step 2 of its own."""
    import pipelines.generate as generate_module

    monkeypatch.setattr(generate_module, "PREVIEW_MIN_INTERVAL_S", 0.0)  # no throttle: every due preview
    events = []
    generate(engine, None, tinyworld(steps=4), progress=events.append)
    assert [e.step for e in events if e.preview is not None] == [2]
    assert events[-1].step == 4 and events[-1].preview is None
    events.clear()
    generate(engine, None, tinyworld(steps=4, enable_hr=True, hr_upscaler="Nearest", hr_scale=1.5,
                                     denoising_strength=0.5, hr_second_pass_steps=3), progress=events.append)
    assert [(e.total_steps, e.step) for e in events if e.preview is not None] == [(4, 2), (3, 2)]


def test_img2img_total_steps_lands_on_the_requested_steps():
    for steps in range(1, 80):
        for strength in [i / 100 for i in range(1, 101)]:
            total = hires.img2img_total_steps(steps, strength)
            assert int(total * strength) == steps, (steps, strength, total)
            assert total == steps or int((total - 1) * strength) < steps  # the smallest such total


def test_hires_negative_prompt_changes_the_second_pass_and_empty_means_the_first_pass_one(engine):
    """A1111: an empty hires negative prompt is the first-pass negative prompt; another one
    conditions the second pass."""
    common = dict(negative_prompt="blurry, dark", **HIRES)
    empty = generate(engine, None, tinyworld(hr_negative_prompt="", **common)).images[0]
    same = generate(engine, None, tinyworld(hr_negative_prompt="blurry, dark", **common)).images[0]
    other = generate(engine, None, tinyworld(hr_negative_prompt="a green circle", **common)).images[0]
    assert same.tobytes() == empty.tobytes()
    # the hires negative prompt is used (so "same == empty" above is not trivially true)
    assert np.abs(np.asarray(other, float) - np.asarray(empty, float)).mean() > 2


def test_model_upscaler_at_denoise_zero_is_the_model_upscaled_first_pass(engine):
    """Pixel-equal: the hires path upscales the same decoded first-pass image with the same
    Upscalers (no extra encode/decode round trip at denoise 0)."""
    plain = generate(engine, None, tinyworld()).images[0]
    expected = upscalers.Upscalers.for_manager(engine).upscale(plain, 128, 128, "2x-tiny")
    image = generate(engine, None, tinyworld(enable_hr=True, hr_upscaler="2x-tiny", hr_scale=2,
                                             denoising_strength=0.0)).images[0]
    assert image.size == (128, 128)
    assert image.tobytes() == expected.tobytes()
    assert image.tobytes() != plain.resize((128, 128), Image.LANCZOS).tobytes()  # the model did the upscale


def test_hires_pass_uses_the_requests_emphasis(engine):
    """The hires pass encodes with the request's emphasis mode, as the first pass does. The first
    pass has no weights here (both modes give it the same tensors), so a difference can only come
    from the hires pass; with all weights 1.0 the two modes are the same encoding, pixel for pixel."""
    def hires_image(hr_prompt, emphasis):
        request = tinyworld(prompt="a red circle", hr_prompt=hr_prompt, emphasis=emphasis, **HIRES)
        return np.asarray(generate(engine, None, request).images[0], float)

    weighted_no_norm = hires_image("a (red:1.6) circle", "No norm")
    weighted_original = hires_image("a (red:1.6) circle", "Original")
    # tiny-world's encoder moves little under mean restoration (mean |diff| ~0.01): exact inequality
    assert not np.array_equal(weighted_no_norm, weighted_original)
    assert np.array_equal(hires_image("a (red:1.0) circle", "No norm"), hires_image("a (red:1.0) circle", "Original"))
