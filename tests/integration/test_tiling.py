"""Seamless tiling (A1111 "Tiling"): inside `circular_padding` the UNet and the VAE commute with
a circular roll (so the picture wraps), outside they do not; every conv's padding mode comes back,
also after an error; a tiled request changes the image, writes `Tiling: True`, and leaves the
cached model exactly as loaded."""
from unittest import mock

import pytest
import torch
from torch import nn

from pipelines import samplers, tiling
from pipelines.generate import generate
from pipelines.metadata import parse_infotext, parse_infotext_typed
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from pipelines.tiling import circular_padding
from tests import factories
from tests.integration.conftest import make_engine

BASE = dict(prompt="a red square on a blue background", width=64, height=64, steps=6, cfg_scale=5, seed=11,
            sampler="Euler", save_images=False)


def tinyworld(**changes) -> GenerationRequest:
    return GenerationRequest(checkpoint="tinyworld", **{**BASE, **changes})


def padding_modes(*modules: nn.Module) -> list[str]:
    return [m.padding_mode for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)]


def roll(x: torch.Tensor, shift: int) -> torch.Tensor:
    return torch.roll(x, shifts=shift, dims=-1)  # along the width


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "other.safetensors", seed=3)
    manager, _ = make_engine(root, root / "data", builtin_dir=Settings(data_dir=root / "data").paths().builtin_dir)
    return manager


# --- the context manager -----------------------------------------------------------------------

@torch.no_grad()
def test_unet_commutes_with_a_circular_roll_only_inside_the_context():
    unet = factories.tiny_unet(seed=0)
    factor = 2 ** (len(unet.config.block_out_channels) - 1)  # one stride-2 conv per block but the last
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 24, generator=gen)
    cond = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)

    def run(z):
        return unet(z, torch.tensor([500]), encoder_hidden_states=cond).sample

    before = padding_modes(unet)
    with circular_padding(unet):
        assert set(padding_modes(unet)) == {"zeros", "circular"}  # 1x1 convs (no padding) left alone
        tiled, tiled_of_rolled = run(x), run(roll(x, factor))
    assert torch.allclose(tiled_of_rolled, roll(tiled, factor), atol=1e-5)
    plain = run(x)
    assert not torch.allclose(run(roll(x, factor)), roll(plain, factor), atol=1e-3)  # zero padding: edges differ
    assert not torch.allclose(tiled, plain, atol=1e-3)
    assert padding_modes(unet) == before


def test_each_conv_gets_its_own_mode_back_also_after_an_error():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 1),
                          nn.Conv2d(3, 3, 3, padding=1))
    shared = model[2]
    with pytest.raises(RuntimeError, match="boom"):
        with circular_padding(model, nn.Sequential(shared), None):  # a conv listed twice, a missing model
            assert padding_modes(model) == ["circular", "zeros", "circular"]
            raise RuntimeError("boom")
    assert padding_modes(model) == ["reflect", "zeros", "zeros"]


# --- requests --------------------------------------------------------------------------------

def test_a_tiled_request_changes_the_image_writes_tiling_and_restores_the_model(engine):
    plain = generate(engine, None, tinyworld())
    with engine.pipeline("txt2img", "tinyworld", "Automatic") as active:
        models = (active.pipe.unet, active.pipe.vae)
        modes = padding_modes(*models)
        weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    tiled = generate(engine, None, tinyworld(tiling=True))
    assert tiled.images[0].tobytes() != plain.images[0].tobytes()
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]
    assert parse_infotext_typed(tiled.infotexts[0])["Tiling"] is True
    assert parse_infotext(tiled.infotexts[0])["Tiling"] == "True"  # what PNG Info's paste gets
    # the cached model is back exactly as loaded: same modes, same weights, the same picture again
    assert padding_modes(*models) == modes and "circular" not in modes
    for model, saved in zip(models, weights):
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert generate(engine, None, tinyworld()).images[0].tobytes() == plain.images[0].tobytes()
    img2img = tinyworld(task="img2img", init_image=plain.images[0], denoising_strength=0.6)
    assert generate(engine, None, img2img.with_changes(tiling=True)).images[0].tobytes() != \
        generate(engine, None, img2img).images[0].tobytes()
    assert padding_modes(*models) == modes


@torch.no_grad()
def test_the_tiled_pipeline_paints_a_picture_that_wraps(engine):
    with engine.pipeline("txt2img", "tinyworld", "Automatic") as active:
        pipe = active.pipe
        shift = 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # latent pixels
        pixels = shift * pipe.vae_scale_factor
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))

        def paint(latents):
            # Euler: no noise drawn during sampling, so only the start latents differ
            pipe.scheduler = samplers.make_scheduler("Euler", "Automatic", dict(pipe.scheduler.config))
            return pipe(prompt=BASE["prompt"], latents=latents, num_inference_steps=4, guidance_scale=5,
                        output_type="pt").images

        def decode(latents):
            return pipe.vae.decode(latents, return_dict=False)[0]

        with circular_padding(pipe.unet, pipe.vae):
            assert torch.allclose(decode(roll(z, shift)), roll(decode(z), pixels), atol=1e-4)
            assert torch.allclose(paint(roll(z, shift)), roll(paint(z), pixels), atol=1e-4)
        assert not torch.allclose(decode(roll(z, shift)), roll(decode(z), pixels), atol=1e-3)
        assert not torch.allclose(paint(roll(z, shift)), roll(paint(z), pixels), atol=1e-3)


def test_a_hires_pass_on_another_checkpoint_is_tiled_and_restored_too(engine):
    request = tinyworld(enable_hr=True, hr_upscaler="Lanczos", hr_resize_x=96, hr_resize_y=96,
                        hr_second_pass_steps=2, denoising_strength=0.6, hr_checkpoint="other")
    with engine.pipeline("img2img", "other", "Automatic") as active:
        models = (active.pipe.unet, active.pipe.vae)
        modes = padding_modes(*models)
    plain = generate(engine, None, request).images[0]
    patched = []

    def recording(*modules):
        patched.extend(modules)
        return circular_padding(*modules)

    with mock.patch.object(tiling, "circular_padding", recording):
        tiled = generate(engine, None, request.with_changes(tiling=True)).images[0]
    assert any(m is models[0] for m in patched) and any(m is models[1] for m in patched)  # the second model too
    assert tiled.size == plain.size == (96, 96) and tiled.tobytes() != plain.tobytes()
    assert padding_modes(*models) == modes and "circular" not in modes
    assert generate(engine, None, request).images[0].tobytes() == plain.tobytes()
