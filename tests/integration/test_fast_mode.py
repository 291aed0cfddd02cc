"""Fast mode (channels_last + fused QKV) gives the plain path's image, and a checkpoint switch
puts the cached modules back exactly as loaded. torch.compile is not run here (too slow on CPU)."""
import numpy as np
import pytest
import torch

from pipelines.generate import generate
from pipelines.optimizations import Optimizations, memory_format_of
from pipelines.request import GenerationRequest
from tests.integration.conftest import make_engine


def _request(checkpoint="tinyA.safetensors"):
    return GenerationRequest(prompt="a red square", checkpoint=checkpoint, width=64, height=64, steps=3, seed=7,
                             sampler="Euler", save_images=False)


def _fused(unet) -> bool:
    return any(type(p).__name__.startswith("Fused") for p in unet.attn_processors.values())


@pytest.fixture(scope="module")
def engines(tiny_models_dir, tmp_path_factory):
    plain, _ = make_engine(tiny_models_dir, tmp_path_factory.mktemp("plain"))
    fast, _ = make_engine(tiny_models_dir, tmp_path_factory.mktemp("fast"))
    fast.fast.options = Optimizations(fast=True)
    return plain, fast


def _pixels(manager, request):
    return np.asarray(generate(manager, None, request).images[0], dtype=np.int16)


def test_fast_mode_image_equals_plain_path(engines):
    plain, fast = engines
    expected = _pixels(plain, _request())
    got = _pixels(fast, _request())
    assert np.abs(got - expected).max() <= 2  # same maths, other summation order
    with fast.pipeline("txt2img", "tinyA.safetensors") as active:
        assert _fused(active.pipe.unet)
        assert memory_format_of(active.pipe.unet) == torch.channels_last
    with plain.pipeline("txt2img", "tinyA.safetensors") as active:
        assert not _fused(active.pipe.unet)
        assert memory_format_of(active.pipe.unet) == torch.contiguous_format


def test_switch_restores_modules_and_switching_back_reapplies(engines):
    plain, fast = engines
    with fast.pipeline("txt2img", "tinyA.safetensors") as active:
        unet_a = active.pipe.unet
        weights = {k: v.clone() for k, v in unet_a.state_dict().items() if "to_qkv" not in k and "to_kv" not in k}
    with fast.pipeline("txt2img", "sub/tinyB.safetensors") as active:
        assert _fused(active.pipe.unet)
    # tinyA sits in the RAM cache as the loader made it: no fused copies, NCHW, same weights
    assert not _fused(unet_a)
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in unet_a.modules())
    assert memory_format_of(unet_a) == torch.contiguous_format
    assert unet_a.state_dict().keys() == weights.keys()
    assert all(torch.equal(unet_a.state_dict()[k], v) for k, v in weights.items())
    assert np.abs(_pixels(fast, _request()) - _pixels(plain, _request())).max() <= 2
    assert fast.load_counts["checkpoint"] == 2  # the switch back came from the RAM cache


def test_requests_with_loras_run_unfused(engines):
    _plain, fast = engines
    with fast.pipeline("txt2img", "tinyA.safetensors") as active:
        components = dict(active.pipe.components)
    assert _fused(components["unet"])
    fast.fast.apply(components, with_loras=True)  # a fused projection would bypass the LoRA deltas
    assert not _fused(components["unet"])
    assert not any(hasattr(m, "to_qkv") for m in components["unet"].modules())
    fast.fast.apply(components)  # no LoRA layers injected: fused again
    assert _fused(components["unet"])
