"""Variation seeds (A1111 "Extra" seed options) on tiny-world: strength 0 is the plain seed's image
bit for bit, strength 1 the subseed's, in between the start noise is A1111's slerp of the two seeds'
CPU noises (image i: seed + i and subseed + i); a random subseed is resolved and written to the
infotext, which reads back into the txt2img form."""
from unittest import mock

import numpy as np
import pytest
import torch

from pipelines import variation
from pipelines.generate import generate
from pipelines.metadata import parse_infotext_typed
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests.integration.conftest import make_engine
from ui.transfers import fields_from_infotext

BASE = dict(prompt="a red square on a blue background", width=64, height=64, steps=6, cfg_scale=5, seed=11,
            sampler="Euler", save_images=False)


def tinyworld(**changes) -> GenerationRequest:
    return GenerationRequest(checkpoint="tinyworld", **{**BASE, **changes})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("variation")
    manager, _ = make_engine(root, root / "data", builtin_dir=Settings(data_dir=root / "data").paths().builtin_dir)
    return manager


@pytest.fixture()
def start_latents(engine):
    """The `latents` argument of every txt2img pipeline call (None: diffusers draws its own)."""
    with engine.pipeline("txt2img", "tinyworld", "Automatic") as active:
        cls = type(active.pipe)
    seen = []
    original = cls.__call__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("latents"))
        return original(self, *args, **kwargs)

    with mock.patch.object(cls, "__call__", recording):
        yield seen


SHAPE = (4, 16, 16)  # tiny-world's latents at 64x64 (its VAE downsamples 4x)


def noise(seed: int) -> torch.Tensor:
    """One image's initial noise as diffusers draws it from Easel's CPU generator."""
    return torch.randn((1, *SHAPE), generator=torch.Generator("cpu").manual_seed(seed))[0]


def a1111_slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """modules/rng.py's slerp written out: the angle along dim 1 of the (C, H, W) noise."""
    cos = ((low / low.norm(dim=1, keepdim=True)) * (high / high.norm(dim=1, keepdim=True))).sum(1)
    omega = torch.acos(cos)
    return (torch.sin((1 - t) * omega) / torch.sin(omega))[:, None] * low + \
        (torch.sin(t * omega) / torch.sin(omega))[:, None] * high


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- slerp ---------------------------------------------------------------------------------------

def test_slerp_ends_are_exact_and_parallel_noise_falls_back_to_lerp():
    low, high = noise(1), noise(2)
    assert torch.equal(variation.slerp(0.0, low, high), low) and torch.equal(variation.slerp(1.0, low, high), high)
    assert torch.allclose(variation.slerp(0.3, low, high), a1111_slerp(0.3, low, high), atol=1e-6)
    assert torch.allclose(variation.slerp(0.3, low, low), low, atol=1e-6)  # acos(1) would give NaN
    assert torch.isfinite(variation.slerp(0.3, low, low * (1 + 1e-7))).all()


# --- generation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])  # Euler a: the later step noise stays the seed's
def test_strength_zero_is_the_plain_seed_bit_for_bit_whatever_the_subseed(engine, start_latents, sampler):
    plain = generate(engine, None, tinyworld(sampler=sampler))
    for subseed in (-1, 5, 12345):
        result = generate(engine, None, tinyworld(sampler=sampler, subseed=subseed, subseed_strength=0.0))
        assert result.images[0].tobytes() == plain.images[0].tobytes()
        assert "Variation seed" not in result.infotexts[0]
    assert start_latents == [None] * 4  # diffusers drew the noise itself, as before the feature


def test_strength_one_is_the_subseeds_picture(engine):
    of_subseed = generate(engine, None, tinyworld(seed=40)).images[0]
    varied = generate(engine, None, tinyworld(seed=11, subseed=40, subseed_strength=1.0)).images[0]
    assert np.abs(pixels(varied) - pixels(of_subseed)).max() <= 1
    assert np.abs(pixels(varied) - pixels(generate(engine, None, tinyworld()).images[0])).max() > 1


def test_half_strength_starts_from_the_slerp_of_both_noises(engine, start_latents):
    result = generate(engine, None, tinyworld(subseed=40, subseed_strength=0.5))
    (latents,) = start_latents
    assert latents.shape == (1, *SHAPE)
    expected = a1111_slerp(0.5, noise(11), noise(40))
    assert torch.allclose(latents[0], expected, atol=1e-6)
    assert not torch.allclose(expected, (noise(11) + noise(40)) / 2, atol=1e-2)  # not a plain average
    image = pixels(result.images[0])
    for seed in (11, 40):
        assert np.abs(image - pixels(generate(engine, None, tinyworld(seed=seed)).images[0])).mean() > 1
    fields = parse_infotext_typed(result.infotexts[0])
    assert (fields["Seed"], fields["Variation seed"], fields["Variation seed strength"]) == (11, 40, 0.5)
    assert result.subseeds == [40]


def test_image_i_of_a_batch_uses_seed_plus_i_and_subseed_plus_i(engine, start_latents):
    result = generate(engine, None, tinyworld(batch_size=2, subseed=40, subseed_strength=0.3))
    (latents,) = start_latents
    for i in range(2):
        assert torch.allclose(latents[i], a1111_slerp(0.3, noise(11 + i), noise(40 + i)), atol=1e-6)
    fields = [parse_infotext_typed(text) for text in result.infotexts]
    assert [(f["Seed"], f["Variation seed"]) for f in fields] == [(11, 40), (12, 41)]
    assert (result.seeds, result.subseeds) == ([11, 12], [40, 41])
    second = generate(engine, None, tinyworld(seed=12, subseed=41, subseed_strength=0.3)).images[0]
    assert np.abs(pixels(second) - pixels(result.images[1])).max() <= 1


def test_a_random_subseed_is_resolved_recorded_and_reproduces_the_picture(engine):
    result = generate(engine, None, tinyworld(subseed=-1, subseed_strength=0.4))
    fields = parse_infotext_typed(result.infotexts[0])
    subseed = fields["Variation seed"]
    assert isinstance(subseed, int) and 0 <= subseed < 2**32 and result.subseeds == [subseed]
    # the infotext, read back as the form would, gives the same picture again
    form = fields_from_infotext(fields)
    assert (form["subseed"], form["subseed_strength"], form["seed"]) == (subseed, 0.4, 11)
    again = generate(engine, None, tinyworld(subseed=form["subseed"], subseed_strength=form["subseed_strength"]))
    assert again.images[0].tobytes() == result.images[0].tobytes()
    plain = parse_infotext_typed(generate(engine, None, tinyworld()).infotexts[0])
    assert fields_from_infotext(plain)["subseed_strength"] == 0.0  # written only when on: absent means 0


def test_img2img_refuses_a_variation_strength():
    from PIL import Image

    with pytest.raises(ValueError, match="variation seeds work in txt2img only"):
        tinyworld(task="img2img", init_image=Image.new("RGB", (64, 64)), subseed_strength=0.5)
    assert tinyworld(task="img2img", init_image=Image.new("RGB", (64, 64)), subseed=5).subseed == 5
