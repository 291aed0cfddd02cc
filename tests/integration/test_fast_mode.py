"""Fast mode (channels_last + fused QKV) gives the plain path's image, and a checkpoint switch
puts the cached modules back exactly as loaded. torch.compile runs with the "eager" backend
(Dynamo tracing and guards, no code generation: seconds on a CPU) on tiny-world: same image as
the plain path, compiled (and reported) once per shape, compiled code dropped on a switch, and a
LoRA hot-swapped into the compiled UNet without a recompile, giving the uncompiled LoRA's image."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.generate import COMPILE_NOTE, generate
from pipelines.optimizations import Optimizations, memory_format_of
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine

TINYWORLD = Path(__file__).resolve().parents[2] / "assets" / "tinyworld" / "tinyworld.safetensors"


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


# --- torch.compile on tiny-world (eager backend) ------------------------------------------------

@pytest.fixture(scope="module")
def tinyworld_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tw-compile")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    (root / "embeddings").mkdir()
    (folder / "tw.safetensors").symlink_to(TINYWORLD)
    factories.write_tiny_checkpoint(folder / "other.safetensors", seed=3)
    return root


def _tw_request(**changes):
    return GenerationRequest(**{**dict(prompt="a red square on a blue background", checkpoint="tw.safetensors",
                                       width=64, height=64, steps=3, seed=11, sampler="Euler", save_images=False),
                                **changes})


def _compiled_engine(root, data, **options):
    torch._dynamo.reset()  # no graphs left over from another test
    manager, _ = make_engine(root, data)
    manager.fast.options = Optimizations(fast=True, compile=True, compile_backend="eager", **options)
    return manager


def _compiled_blocks(unet) -> list[str]:
    return [type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]


@pytest.mark.slow
def test_compiled_unet_gives_the_plain_image_compiles_once_per_shape_and_is_dropped_on_switch(
        tinyworld_root, tmp_path):
    plain, _ = make_engine(tinyworld_root, tmp_path / "plain")
    fast = _compiled_engine(tinyworld_root, tmp_path / "fast")
    notes = []
    sink = lambda p: notes.append(p.note) if p.note else None  # noqa: E731
    expected = _pixels(plain, _tw_request())
    got = np.asarray(generate(fast, None, _tw_request(), progress=sink).images[0], dtype=np.int16)
    assert np.abs(got - expected).max() <= 2
    assert notes == [COMPILE_NOTE]
    with fast.pipeline("txt2img", "tw.safetensors") as active:
        unet = active.pipe.unet
    blocks = _compiled_blocks(unet)
    assert blocks and set(blocks) == {"BasicTransformerBlock"}  # regional: the repeated blocks only
    with torch._dynamo.config.patch(error_on_recompile=True):  # the same shape again reuses the graphs
        again = np.asarray(generate(fast, None, _tw_request(), progress=sink).images[0], dtype=np.int16)
    assert np.array_equal(again, got) and notes == [COMPILE_NOTE]
    with fast.pipeline("txt2img", "other.safetensors"):
        pass
    assert _compiled_blocks(unet) == []  # the cached tiny-world UNet runs uncompiled again
    generate(fast, None, _tw_request(), progress=sink)  # back: compiled again, and said so
    assert notes == [COMPILE_NOTE] * 2


@pytest.mark.slow
def test_a_lora_hot_swapped_into_the_compiled_unet_does_not_recompile(tinyworld_root, tmp_path):
    plain, _ = make_engine(tinyworld_root, tmp_path / "plain")
    fast = _compiled_engine(tinyworld_root, tmp_path / "fast", lora_hotswap_rank=8)
    generate(fast, None, _tw_request())
    with fast.pipeline("txt2img", "tw.safetensors") as active:
        pipe = active.pipe
        assert not _fused(pipe.unet)  # hot-swap mode keeps the projections LoRA layers wrap
        layers = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        lora_a, lora_b = (factories.write_tiny_lora(tmp_path / f"{name}.safetensors", seed=seed, fmt="peft",
                                                    only="unet", rank=4, components=layers)
                          for name, seed in (("a", 1), ("b", 2)))
        pipe.load_lora_weights(str(lora_a), adapter_name="slot")  # first LoRA: padded to rank 8
    with_a = _pixels(fast, _tw_request())  # LoRA layers injected: this pass recompiles, once
    with fast.pipeline("txt2img", "tw.safetensors") as active:
        active.pipe.load_lora_weights(str(lora_b), adapter_name="slot", hotswap=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with_b = _pixels(fast, _tw_request())
    with plain.pipeline("txt2img", "tw.safetensors") as active:
        active.pipe.load_lora_weights(str(lora_b), adapter_name="slot")
    expected_b = _pixels(plain, _tw_request())
    assert np.abs(with_b - expected_b).max() <= 2  # B's image, not A's
    assert np.abs(with_a - expected_b).max() > 10
