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


# --- --medvram / --lowvram wiring on a (fake) CUDA device ----------------------------------------

class _LoggingModule(torch.nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def to(self, *args, **kwargs):  # no CUDA here: record where the manager puts it
        self.log.append(("to", self.name, args[0] if args else kwargs.get("device")))
        return self


class _OffloadPipe:
    """What MemoryPlan.offload touches on a diffusers pipeline, recorded."""

    def __init__(self):
        self.log = []
        self.components = {"unet": _LoggingModule("unet", self.log), "vae": _LoggingModule("vae", self.log),
                           "tokenizer": object(), "scheduler": object()}

    def enable_model_cpu_offload(self, device):
        self.log.append(("model offload", device))

    def enable_sequential_cpu_offload(self, device):
        self.log.append(("sequential offload", device))

    def remove_all_hooks(self):
        self.log.append(("hooks removed",))


@pytest.mark.parametrize("mode, offload", [("medvram", "model offload"), ("lowvram", "sequential offload")])
def test_offload_modes_on_cuda_offload_then_remove_hooks_and_put_modules_back(mode, offload):
    cuda = torch.device("cuda")
    plan = MemoryPlan(MemoryOptions(mode=mode))
    pipe = _OffloadPipe()
    with plan.offload(pipe, cuda):
        assert pipe.log == [(offload, cuda)]  # during the request: offloaded, nothing else
    assert pipe.log == [(offload, cuda), ("hooks removed",), ("to", "unet", cuda), ("to", "vae", cuda)]
    failing = _OffloadPipe()
    with pytest.raises(RuntimeError, match="boom"):
        with plan.offload(failing, cuda):
            raise RuntimeError("boom")
    assert failing.log[1:] == [("hooks removed",), ("to", "unet", cuda), ("to", "vae", cuda)]  # also after a failure
    normal = _OffloadPipe()
    with MemoryPlan(MemoryOptions()).offload(normal, cuda):
        pass
    assert normal.log == []


# --- attention slicing fallback after out of memory ---------------------------------------------

def _processor_names(unet) -> set[str]:
    return {type(p).__name__ for p in unet.attn_processors.values()}


def test_out_of_memory_is_retried_once_with_attention_and_vae_slicing_then_restored(tinyworld_engine, monkeypatch,
                                                                                     caplog):
    request = GenerationRequest(prompt="a red square", checkpoint="tw.safetensors", width=64, height=64, steps=3,
                                seed=4, sampler="Euler", save_images=False)
    expected = np.asarray(generate(tinyworld_engine, None, request).images[0], dtype=np.int16)
    with tinyworld_engine.pipeline("txt2img", "tw.safetensors") as active:
        unet, vae = active.pipe.unet, active.pipe.vae
    before = _processor_names(unet)
    seen = []  # the UNet's attention processors at each of its calls
    hook = unet.register_forward_pre_hook(lambda module, _args: seen.append(_processor_names(module)))
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    raised = []

    def sdpa_out_of_memory_once(*args, **kwargs):
        if seen and not raised:  # the first attention inside the first UNet pass (not the text encoder's)
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_out_of_memory_once)
    try:
        with caplog.at_level("WARNING", logger="easel.generate"):
            got = np.asarray(generate(tinyworld_engine, None, request).images[0], dtype=np.int16)
    finally:
        hook.remove()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real_sdpa)
    assert raised and "trying the batch again with attention and VAE slicing" in caplog.text
    assert seen[0] == before and all(names == {"SlicedAttnProcessor"} for names in seen[1:])  # the retry was sliced
    assert len(seen) == 1 + 3  # one failed call, then the 3 steps (CFG in one batch)
    assert np.abs(got - expected).max() <= 2  # slicing is the same maths in pieces
    assert _processor_names(unet) == before and not vae.use_slicing  # restored after
    again = np.asarray(generate(tinyworld_engine, None, request).images[0], dtype=np.int16)
    assert np.array_equal(again, expected)
