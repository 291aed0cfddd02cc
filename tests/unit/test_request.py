import pytest
from PIL import Image

from pipelines.request import GenerationRequest


def test_defaults_are_valid_and_sampler_names_are_canonical():
    r = GenerationRequest(prompt="a cat", sampler="DPM++ 2M Karras", schedule="Automatic")
    assert (r.sampler, r.schedule) == ("DPM++ 2M", "Karras")
    assert r.total_images == 1


@pytest.mark.parametrize("changes, message", [
    (dict(width=100), "width must be a multiple of 8"),
    (dict(height=4100), "height must be a multiple of 8"),
    (dict(steps=0), "steps must be between"),
    (dict(seed=-5), "seed must be -1"),
    (dict(batch_size=0), "batch size"),
    (dict(denoising_strength=1.5), "denoising strength"),
    (dict(task="img2img"), "needs an init image"),
    (dict(task="inpaint", init_image=Image.new("RGB", (64, 64))), "needs a mask"),
    (dict(task="paint"), "task must be one of"),
    (dict(resize_mode="stretch"), "resize mode"),
    (dict(inpainting_fill="latent noise"), "masked content"),
    (dict(sampler="Restart"), "Restart"),
    (dict(sampler="No Such Sampler"), "No Such Sampler"),
])
def test_bad_input_gives_a_specific_message(changes, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**changes)


def test_json_round_trip_keeps_images_and_fields():
    init = Image.new("RGB", (64, 48), (10, 200, 30))
    mask = Image.new("L", (64, 48), 255)
    r = GenerationRequest(task="inpaint", prompt="p", init_image=init, mask=mask, resize_mode=1, seed=42)
    assert r.resize_mode == "crop and resize"
    back = GenerationRequest.from_dict(r.to_dict())
    assert back == r
    assert back.init_image.tobytes() == init.tobytes() and back.mask.tobytes() == mask.tobytes()


def test_unknown_fields_are_rejected_by_name():
    with pytest.raises(ValueError, match="colour"):
        GenerationRequest.from_dict({"prompt": "x", "colour": "red"})


def test_prompt_fields_round_trip_and_validate():
    from pipelines.request import GenerationRequest as R

    request = R(prompt="x", styles=["Cinematic", "Warm"], clip_skip=2, wildcard_mode="combinatorial")
    assert request.styles == ("Cinematic", "Warm")
    data = request.to_dict()
    assert R.from_dict(data) == request and R.from_dict({**data, "styles": list(data["styles"])}) == request
    assert R().styles == () and R().clip_skip == 1
    for bad in (dict(clip_skip=0), dict(clip_skip=13), dict(styles="Cinematic"), dict(wildcard_mode="x")):
        with pytest.raises(ValueError):
            R(**bad)


def test_variation_seeds_round_trip_and_validate():
    request = GenerationRequest(prompt="x", subseed=7, subseed_strength=0.4)
    assert GenerationRequest.from_dict(request.to_dict()) == request
    assert (GenerationRequest().subseed, GenerationRequest().subseed_strength) == (-1, 0.0)
    for bad, message in ((dict(subseed=-2), "variation seed must be -1"), (dict(subseed_strength=1.2), "between 0 and 1"),
                         (dict(task="img2img", init_image=Image.new("RGB", (64, 64)), subseed_strength=0.1),
                          "txt2img only")):
        with pytest.raises(ValueError, match=message):
            GenerationRequest(**bad)


def test_tiling_is_a_flag_that_round_trips():
    request = GenerationRequest(prompt="x", tiling=True)
    assert GenerationRequest.from_dict(request.to_dict()) == request and not GenerationRequest().tiling
    with pytest.raises(ValueError, match="tiling must be true or false, got 'yes'"):
        GenerationRequest(tiling="yes")
