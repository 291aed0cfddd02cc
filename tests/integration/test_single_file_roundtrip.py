"""Checkpoints written by tests.factories load through diffusers' own single-file path, offline,
with the bundled configs, and hold exactly the weights they were written from."""
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors import safe_open

from pipelines.arch import Arch
from pipelines.configs import config_dir, load_tokenizer
from tests import factories


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def load_single_file_pipeline(path, arch_dir, tokenizer, **kwargs) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(arch_dir),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        tokenizer=tokenizer,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unequal_tensors(actual: dict, expected: dict) -> list[str]:
    assert sorted(actual) == sorted(expected)
    return [key for key in expected if not torch.equal(actual[key], expected[key])]


def file_tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def file_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_environment_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tiny_checkpoint_loads_with_identical_weights_and_generates(tmp_path, tokenizer):
    path = factories.write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=0)
    pipe = load_single_file_pipeline(path, config_dir(Arch.TINYWORLD), tokenizer)
    expected = factories.tiny_components(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        assert unequal_tensors(getattr(pipe, name).state_dict(), expected[name].state_dict()) == [], name
    assert type(pipe.scheduler) is type(expected["scheduler"])
    assert pipe.vae.config.scaling_factor == expected["vae"].config.scaling_factor

    images = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.01  # a random model still draws something, not a flat colour


def test_tiny_checkpoint_metadata_has_modelspec_and_extra_keys(tmp_path):
    path = factories.write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=3,
                                           metadata={"ss_output_name": "x", "modelspec.title": "mine"})
    assert file_metadata(path) == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "easel/tiny-world-v1",
        "modelspec.title": "mine",
        "modelspec.resolution": "64x64",
        "ss_output_name": "x",
    }
    keys = file_tensors(path)
    assert "model.diffusion_model.output_blocks.5.1.proj_out.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_tiny_checkpoints_are_deterministic_per_seed(tmp_path):
    first = factories.write_tiny_checkpoint(tmp_path / "a.safetensors", seed=0)
    again = factories.write_tiny_checkpoint(tmp_path / "b.safetensors", seed=0)
    other = factories.write_tiny_checkpoint(tmp_path / "c.safetensors", seed=1)
    assert first.read_bytes() == again.read_bytes()
    first_tensors, other_tensors = file_tensors(first), file_tensors(other)
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.decoder.conv_out.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert not torch.equal(first_tensors[key], other_tensors[key]), key


def test_standalone_vae_loads_and_decodes_differently_from_the_checkpoint_vae(tmp_path):
    path = factories.write_tiny_vae(tmp_path / "vae.safetensors", seed=1)
    keys = file_tensors(path)
    assert all(key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for key in keys)
    vae = AutoencoderKL.from_single_file(str(path), config=str(config_dir(Arch.TINYWORLD)), subfolder="vae",
                                         local_files_only=True)
    assert unequal_tensors(vae.state_dict(), factories.tiny_vae(seed=1).state_dict()) == []

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = vae.decode(latents).sample
        seed0 = factories.tiny_vae(seed=0).decode(latents).sample

    def to_uint8(x):
        return ((x / 2 + 0.5).clamp(0, 1) * 255).round()

    assert (to_uint8(own) - to_uint8(seed0)).abs().mean() > 20


@pytest.mark.slow
def test_full_size_sd15_random_checkpoint_loads_offline(tmp_path, tokenizer):
    path = factories.write_full_size_sd15_checkpoint(tmp_path / "sd15.safetensors", seed=0)
    assert 1.9e9 < path.stat().st_size < 2.3e9
    with safe_open(str(path), framework="pt") as handle:
        conv_in = handle.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
        q_weight = handle.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert conv_in.dtype == torch.float16 and q_weight.shape == (512, 512, 1, 1)

    pipe = load_single_file_pipeline(path, config_dir(Arch.SD1), tokenizer, torch_dtype=torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 123_060_480
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert torch.equal(pipe.unet.conv_in.weight, conv_in)
    assert torch.equal(pipe.vae.encoder.mid_block.attentions[0].to_q.weight, q_weight[:, :, 0, 0])
