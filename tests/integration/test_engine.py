"""The engine on tiny random-weight models: determinism, swaps, cache, img2img and inpaint
semantics, and errors that leave the previous state in place."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.generate import generate, roundtrip_through_vae
from pipelines.loading import ModelLoadError
from pipelines.request import GenerationRequest
from tests.integration.conftest import make_engine

BASE = dict(prompt="a red circle on a blue background", width=64, height=64, steps=4,
            cfg_scale=5, sampler="Euler", save_images=False)


def run(manager, outputs=None, **changes):
    return generate(manager, outputs, GenerationRequest(**{**BASE, **changes}))


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_txt2img_is_deterministic_per_seed_and_batch_seeds_increment(engine):
    manager, _ = engine
    a = run(manager, seed=7, checkpoint="tinyA.safetensors", batch_size=2)
    b = run(manager, seed=7, checkpoint="tinyA.safetensors", batch_size=2)
    c = run(manager, seed=8, checkpoint="tinyA.safetensors")
    assert a.seeds == [7, 8]
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    # image 2 of a seed-7 batch is the seed-8 image: per-image CPU seeds, as A1111 does
    assert np.abs(pixels(a.images[1]) - pixels(c.images[0])).max() <= 1
    assert a.images[0].tobytes() != a.images[1].tobytes()


def test_outputs_are_saved_with_infotext(engine, tmp_path):
    from pipelines.metadata import parse_infotext, read_infotext

    manager, outputs = engine
    result = run(manager, outputs, seed=123, checkpoint="tinyA", save_images=True, batch_count=2)
    assert [p.name[6:] for p in result.paths] == ["123.png", "124.png"]
    assert result.paths[0].parent.parent.name == "txt2img-images"
    with Image.open(result.paths[1]) as saved:
        assert saved.tobytes() == result.images[1].tobytes()
        fields = parse_infotext(read_infotext(saved))
    assert fields["Prompt"] == BASE["prompt"]
    assert str(fields["Seed"]) == "124" and str(fields["Steps"]) == "4"
    assert fields["Model"] == "tinyA" and len(fields["Model hash"]) == 10


def test_checkpoint_swap_a_b_a_matches_fresh_load_and_cache_saves_a_load(tiny_models_dir, tmp_path):
    manager, _ = make_engine(tiny_models_dir, tmp_path / "swap")
    a1 = run(manager, seed=3, checkpoint="tinyA.safetensors").images[0]
    b = run(manager, seed=3, checkpoint="sub/tinyB.safetensors").images[0]
    a2 = run(manager, seed=3, checkpoint="tinyA.safetensors").images[0]
    assert a1.tobytes() != b.tobytes()
    assert a1.tobytes() == a2.tobytes()
    assert manager.load_counts["checkpoint"] == 2  # the way back to A came from the RAM cache

    fresh, _ = make_engine(tiny_models_dir, tmp_path / "fresh")
    assert run(fresh, seed=3, checkpoint="tinyA.safetensors").images[0].tobytes() == a1.tobytes()

    no_cache, _ = make_engine(tiny_models_dir, tmp_path / "nocache", ram_bytes=0)
    for name in ("tinyA.safetensors", "sub/tinyB.safetensors", "tinyA.safetensors"):
        run(no_cache, seed=3, checkpoint=name)
    assert no_cache.load_counts["checkpoint"] == 3


def test_vae_swap_changes_pixels_and_automatic_restores_them(engine):
    manager, _ = engine
    own = run(manager, seed=5, checkpoint="tinyA", vae="Automatic").images[0]
    warm = run(manager, seed=5, checkpoint="tinyA", vae="warm.safetensors")
    back = run(manager, seed=5, checkpoint="tinyA", vae="Automatic").images[0]
    assert np.abs(pixels(own) - pixels(warm.images[0])).mean() > 5
    assert own.tobytes() == back.tobytes()
    assert "VAE: warm.safetensors" in warm.infotexts[0]
    assert manager.snapshot()["vae"] == "Automatic"


def test_errors_leave_the_previous_model_loaded(engine):
    manager, _ = engine
    run(manager, seed=1, checkpoint="tinyA")
    before = manager.snapshot()
    with pytest.raises(ValueError, match="not found"):
        run(manager, checkpoint="nope.safetensors")
    with pytest.raises(ValueError, match="broken.safetensors.*skipped"):
        run(manager, checkpoint="broken.safetensors")  # refused at scan time, with the reason
    with pytest.raises(ModelLoadError, match="architecture not recognised"):
        run(manager, checkpoint="actually-a-vae.safetensors")
    with pytest.raises(ValueError, match="multiple of 8"):
        run(manager, width=100)
    assert manager.snapshot()["checkpoint"] == before["checkpoint"]
    assert run(manager, seed=1, checkpoint="tinyA").images  # still serving


def _init_image():
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    return image


def test_img2img_strength_zero_returns_the_vae_roundtrip_and_one_ignores_the_init(engine):
    manager, _ = engine
    init = _init_image()
    zero = run(manager, task="img2img", init_image=init, denoising_strength=0.0, seed=2, checkpoint="tinyA")
    with manager.pipeline("img2img", "tinyA") as active:
        expected = roundtrip_through_vae(active.pipe.vae, init)
    assert zero.images[0].tobytes() == expected.tobytes()

    other = Image.new("RGB", (64, 64), (250, 250, 10))
    full = [run(manager, task="img2img", init_image=i, denoising_strength=1.0, seed=2, checkpoint="tinyA").images[0]
            for i in (init, other)]
    half = [run(manager, task="img2img", init_image=i, denoising_strength=0.5, seed=2, checkpoint="tinyA").images[0]
            for i in (init, other)]
    diff_full = np.abs(pixels(full[0]) - pixels(full[1])).mean()
    diff_half = np.abs(pixels(half[0]) - pixels(half[1])).mean()
    assert diff_full < diff_half / 3, (diff_full, diff_half)


@pytest.mark.parametrize("only_masked", [False, True])
def test_inpaint_leaves_unmasked_pixels_untouched(engine, only_masked):
    manager, _ = engine
    init = _init_image()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 31, 31), fill=255)
    result = run(manager, task="inpaint", init_image=init, mask=mask, mask_blur=0, denoising_strength=1.0,
                 seed=4, checkpoint="tinyA", inpaint_full_res=only_masked, inpaint_full_res_padding=4,
                 inpainting_fill="fill")
    out, orig, m = pixels(result.images[0]), pixels(init), np.asarray(mask) > 0
    assert (out[~m] == orig[~m]).all()
    assert np.abs(out[m] - orig[m]).mean() > 10
    assert "Inpaint area: " + ("Only masked" if only_masked else "Whole picture") in result.infotexts[0]


def test_inverted_mask_repaints_the_outside(engine):
    manager, _ = engine
    init = _init_image()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 31, 31), fill=255)
    result = run(manager, task="inpaint", init_image=init, mask=mask, mask_blur=0, denoising_strength=1.0,
                 seed=4, checkpoint="tinyA", inpainting_mask_invert=True)
    out, orig, m = pixels(result.images[0]), pixels(init), np.asarray(mask) > 0
    assert (out[m] == orig[m]).all() and np.abs(out[~m] - orig[~m]).mean() > 10


def test_interrupt_stops_early_and_returns_an_image(engine):
    from pipelines.jobs import CancelToken

    manager, _ = engine
    token, steps = CancelToken(), []

    def progress(p):
        steps.append(p.step)
        if p.step == 2:
            token.cancel()

    result = generate(manager, None, GenerationRequest(**{**BASE, "steps": 10, "batch_count": 3,
                                                          "checkpoint": "tinyA"}), progress, token)
    assert result.interrupted and len(result.images) == 1 and max(steps) == 2


def test_every_sampler_runs_through_the_pipeline(engine):
    from pipelines import samplers

    manager, _ = engine
    for name in samplers.sampler_names():
        result = run(manager, sampler=name, steps=3, seed=1, checkpoint="tinyA")
        assert np.asarray(result.images[0]).std() > 0, name


def test_sde_sampler_is_reproducible_per_seed(engine):
    manager, _ = engine
    a = run(manager, sampler="DPM++ SDE", steps=3, seed=11, checkpoint="tinyA").images[0]
    b = run(manager, sampler="DPM++ SDE", steps=3, seed=11, checkpoint="tinyA").images[0]
    assert a.tobytes() == b.tobytes()
