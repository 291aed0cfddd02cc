"""Memory modes: VAE tiling past a size (same picture as the untiled decode, within what tiling
changes), flags restored after; offload modes are no-ops on CPU and leave images unchanged."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.generate import decode_latents, encode_image, generate
from pipelines.memory import MemoryOptions, MemoryPlan, final_size, vae_tiling
from pipelines.request import GenerationRequest
from tests.integration.conftest import make_engine


@pytest.fixture(scope="module")
def tinyworld_engine(tmp_path_factory):
    from pathlib import Path
    root = tmp_path_factory.mktemp("tw")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    (root / "embeddings").mkdir()
    (folder / "tw.safetensors").symlink_to(Path("assets/tinyworld/tinyworld.safetensors").resolve())
    manager, _ = make_engine(root, root / "data")
    return manager


def _psnr(a, b) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def test_tiled_vae_decode_matches_untiled(tinyworld_engine):
    picture = Image.new("RGB", (160, 160), (40, 60, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((30, 40, 120, 110), fill=(220, 30, 30))
    draw.ellipse((90, 10, 150, 70), fill=(30, 200, 40))
    with tinyworld_engine.pipeline("txt2img", "tw.safetensors") as active:
        vae = active.pipe.vae
        latents = encode_image(vae, picture)
        plain = np.asarray(decode_latents(vae, latents)[0])
        calls = []
        hook = vae.decoder.register_forward_hook(lambda *_: calls.append(1))
        try:
            with vae_tiling(vae, enabled=True):
                tiled = np.asarray(decode_latents(vae, latents)[0])
        finally:
            hook.remove()
        assert not vae.use_tiling and not vae.use_slicing  # the cached VAE is left as it was
    assert len(calls) > 1  # 160 px > the 64 px tile: it really decoded tile by tile
    assert tiled.shape == plain.shape
    # tiny-world's VAE tiles are 64 px (its native size) with mid-block attention, so each tile
    # normalises on its own; the picture stays (measured ~19 dB; an unrelated image is ~8 dB)
    assert _psnr(tiled, plain) > 16
    assert _psnr(np.asarray(picture), plain) > 12 and abs(tiled.mean() - plain.mean()) < 8


def test_tiling_switches_on_past_the_size_setting():
    plan = MemoryPlan(MemoryOptions(vae_tile_above_pixels=1024 * 1024))
    assert not plan.wants_vae_tiling(1024, 1024)
    assert plan.wants_vae_tiling(1024, 1032)
    assert not MemoryPlan(MemoryOptions(vae_tile_above_pixels=0)).wants_vae_tiling(8192, 8192)
    request = GenerationRequest(prompt="x", width=512, height=768, enable_hr=True, hr_scale=2.0)
    assert final_size(request) == (1024, 1536)
    with pytest.raises(ValueError, match="memory mode"):
        MemoryOptions(mode="tinyvram")


def test_offload_modes_are_noops_on_cpu_with_a_log_line(tinyworld_engine, caplog):
    request = GenerationRequest(prompt="a red square", checkpoint="tw.safetensors", width=64, height=64, steps=3,
                                seed=3, sampler="Euler", save_images=False)
    expected = np.asarray(generate(tinyworld_engine, None, request).images[0])
    original = tinyworld_engine.memory
    tinyworld_engine.memory = MemoryPlan(MemoryOptions(mode="lowvram"))
    try:
        with caplog.at_level("INFO", logger="easel.memory"):
            got = np.asarray(generate(tinyworld_engine, None, request).images[0])
    finally:
        tinyworld_engine.memory = original
    assert np.array_equal(got, expected)
    assert "--lowvram: no effect on cpu" in caplog.text
