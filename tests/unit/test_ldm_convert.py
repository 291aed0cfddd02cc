"""pipelines.ldm_convert: diffusers -> LDM keys, checked against diffusers' own LDM -> diffusers
converters (tiny configs, real tensors) and against well-known SD key names (meta tensors)."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from safetensors import safe_open
from transformers import CLIPTextModel

from pipelines.ldm_convert import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_text_to_ldm,
    pipeline_to_ldm,
    save_ldm_checkpoint,
    unet_to_ldm,
    vae_to_ldm,
)
from pipelines.arch import Arch
from pipelines.configs import config_dir
from tests.factories import tiny_components

SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "sample_size": 64,
}
SD2_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def tiny_ldm(tiny):
    return pipeline_to_ldm(tiny["unet"], tiny["vae"], tiny["text_encoder"])


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_vae(config: dict) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**config)


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert unequal == []


# --- tiny configs: round trip through diffusers' own converters -----------------------------


def test_tiny_unet_round_trips_through_diffusers_converter(tiny, tiny_ldm):
    original = tiny["unet"].state_dict()
    unet_keys = [k for k in tiny_ldm if k.startswith(UNET_PREFIX)]
    assert len(unet_keys) == len(original)
    back = convert_ldm_unet_checkpoint(tiny_ldm, dict(tiny["unet"].config))
    assert_same_tensors(back, original)


def test_tiny_vae_round_trips_through_diffusers_converter(tiny, tiny_ldm):
    original = tiny["vae"].state_dict()
    assert len([k for k in tiny_ldm if k.startswith(VAE_PREFIX)]) == len(original)
    back = convert_ldm_vae_checkpoint(tiny_ldm, dict(tiny["vae"].config))
    assert_same_tensors(back, original)


def test_tiny_vae_attention_is_stored_as_1x1_conv(tiny, tiny_ldm):
    linear = tiny["vae"].state_dict()["decoder.mid_block.attentions.0.to_q.weight"]
    conv = tiny_ldm[VAE_PREFIX + "decoder.mid.attn_1.q.weight"]
    assert conv.shape == (*linear.shape, 1, 1)
    assert torch.equal(conv[:, :, 0, 0], linear)
    assert tiny_ldm[VAE_PREFIX + "decoder.mid.attn_1.q.bias"].shape == linear.shape[:1]


def test_tiny_text_encoder_round_trips_through_diffusers_loader(tiny, tiny_ldm):
    original = tiny["text_encoder"].state_dict()
    assert len([k for k in tiny_ldm if k.startswith(CLIP_PREFIX)]) == len(original)
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, tiny_ldm, subfolder="text_encoder", config=str(config_dir(Arch.TINYWORLD)), local_files_only=True
    )
    assert_same_tensors(loaded.state_dict(), original)


def test_pipeline_to_ldm_prefixes_every_key_and_keeps_the_count(tiny, tiny_ldm):
    counts = {prefix: sum(k.startswith(prefix) for k in tiny_ldm) for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    assert counts == {
        UNET_PREFIX: len(tiny["unet"].state_dict()),
        VAE_PREFIX: len(tiny["vae"].state_dict()),
        CLIP_PREFIX: len(tiny["text_encoder"].state_dict()),
    }
    assert sum(counts.values()) == len(tiny_ldm)
    assert CLIP_PREFIX + "text_model.embeddings.token_embedding.weight" in tiny_ldm
    assert all(tensor.is_contiguous() for tensor in tiny_ldm.values())


def test_tiny_upsampler_slot_depends_on_attention(tiny_ldm):
    # up block 0 is a plain UpBlock2D (upsampler at .1), up block 1 has cross-attention (at .2).
    assert UNET_PREFIX + "output_blocks.1.1.conv.weight" in tiny_ldm
    assert UNET_PREFIX + "output_blocks.3.2.conv.weight" in tiny_ldm
    assert UNET_PREFIX + "output_blocks.3.1.proj_in.weight" in tiny_ldm
    assert UNET_PREFIX + "input_blocks.2.0.op.weight" in tiny_ldm
    assert not any(k.startswith(UNET_PREFIX + "input_blocks.6.") for k in tiny_ldm)


# --- full-size layouts on the meta device (no memory) ----------------------------------------


def test_sd15_unet_produces_the_well_known_ldm_keys_and_shapes():
    unet = meta_unet(SD15_UNET)
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    expected_shapes = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {key: tuple(ldm[key].shape) for key in expected_shapes} == expected_shapes
    assert len(ldm) == 686  # the model.diffusion_model.* count of an SD1.5 checkpoint
    assert not any(key.startswith(("input_blocks.12.", "output_blocks.12.", "label_emb")) for key in ldm)


@pytest.mark.parametrize("config", [SD15_UNET, SD2_UNET, SDXL_UNET], ids=["sd15", "sd2", "sdxl"])
def test_full_size_unet_layouts_round_trip_through_diffusers_converter(config):
    unet = meta_unet(config)
    original = unet.state_dict()
    ldm = {UNET_PREFIX + k: v for k, v in unet_to_ldm(original, unet.config).items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert sorted(back) == sorted(original)
    assert all(back[key].shape == original[key].shape for key in original)


@pytest.mark.parametrize("arch", [a for a in Arch if a is not Arch.UNKNOWN], ids=lambda a: a.value)
def test_every_bundled_config_round_trips_through_diffusers_converters(arch):
    unet = meta_unet(dict(UNet2DConditionModel.load_config(config_dir(arch) / "unet")))
    unet_original = unet.state_dict()
    unet_ldm = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_original, unet.config).items()}
    unet_back = convert_ldm_unet_checkpoint(unet_ldm, dict(unet.config))
    assert sorted(unet_back) == sorted(unet_original)
    assert all(unet_back[key].shape == unet_original[key].shape for key in unet_original)

    vae = meta_vae(dict(AutoencoderKL.load_config(config_dir(arch) / "vae")))
    vae_original = vae.state_dict()
    vae_back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_original).items()},
                                          dict(vae.config))
    assert sorted(vae_back) == sorted(vae_original)
    assert all(vae_back[key].shape == vae_original[key].shape for key in vae_original)


def test_sd2_and_sdxl_keep_linear_projections_and_label_emb():
    sd2 = unet_to_ldm(meta_unet(SD2_UNET).state_dict(), meta_unet(SD2_UNET).config)
    assert tuple(sd2["middle_block.1.proj_in.weight"].shape) == (1280, 1280)
    assert tuple(sd2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 1024)
    sdxl_unet = meta_unet(SDXL_UNET)
    sdxl = unet_to_ldm(sdxl_unet.state_dict(), sdxl_unet.config)
    assert tuple(sdxl["label_emb.0.0.weight"].shape) == (1280, 2816)
    assert "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in sdxl
    assert "output_blocks.8.0.skip_connection.weight" in sdxl


def test_sd_vae_reverses_decoder_block_numbering():
    vae = meta_vae(SD_VAE)
    original = vae.state_dict()
    ldm = vae_to_ldm(original)
    # LDM's decoder.up.0 is the full-resolution block (128 channels, skip from 256); up.3 the lowest.
    assert tuple(ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(ldm["decoder.up.3.upsample.conv.weight"].shape) == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert tuple(ldm["encoder.down.0.downsample.conv.weight"].shape) == (128, 128, 3, 3)
    assert tuple(ldm["encoder.mid.attn_1.proj_out.weight"].shape) == (512, 512, 1, 1)
    assert tuple(ldm["decoder.norm_out.weight"].shape) == (128,)
    assert len(ldm) == len(original) == 248
    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    assert sorted(back) == sorted(original)
    assert all(back[key].shape == original[key].shape for key in original)


# --- CLIP text keys ----------------------------------------------------------------------------


def test_clip_text_accepts_flat_and_wrapped_layouts_and_drops_position_ids():
    weight = torch.ones(3, 2)
    flat = clip_text_to_ldm({"embeddings.token_embedding.weight": weight, "embeddings.position_ids": torch.arange(3)})
    wrapped = clip_text_to_ldm({"text_model.embeddings.token_embedding.weight": weight,
                                "text_model.embeddings.position_ids": torch.arange(3)})
    assert list(flat) == list(wrapped) == ["text_model.embeddings.token_embedding.weight"]
    assert flat["text_model.embeddings.token_embedding.weight"] is weight


# --- tensors, bad input, saving ------------------------------------------------------------------


def test_converted_tensors_are_contiguous_copies_of_transposed_input():
    weight = torch.arange(6.0).reshape(2, 3).t()
    converted = clip_text_to_ldm({"final_layer_norm.weight": weight})["text_model.final_layer_norm.weight"]
    assert converted.is_contiguous() and torch.equal(converted, weight)


@pytest.mark.parametrize(
    "state_dict, message",
    [
        ({"down_blocks.0.resnets.0.mystery.weight": torch.zeros(1)}, "resnet"),
        ({"down_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}, "down block 7"),
        ({"down_blocks.0.resnets.1.conv1.weight": torch.zeros(1)}, "layer 1"),
        ({"controlnet_mid_block.weight": torch.zeros(1)}, "Unexpected UNet key"),
    ],
)
def test_unet_rejects_keys_outside_the_config(tiny, state_dict, message):
    with pytest.raises(ValueError, match=message):
        unet_to_ldm(state_dict, tiny["unet"].config)


def test_unet_rejects_per_block_layer_counts(tiny):
    config = {**tiny["unet"].config, "layers_per_block": [1, 2, 2]}
    with pytest.raises(ValueError, match="layers_per_block"):
        unet_to_ldm({}, config)


def test_vae_and_clip_reject_foreign_keys():
    with pytest.raises(ValueError, match="VAE key"):
        vae_to_ldm({"encoder.stages.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="CLIP text key"):
        clip_text_to_ldm({"vision_model.post_layernorm.weight": torch.zeros(1)})


def test_save_ldm_checkpoint_writes_tensors_and_metadata(tmp_path):
    tensors = {"first_stage_model.quant_conv.weight": torch.randn(8, 8, 1, 1), "b": torch.arange(4.0).reshape(2, 2).t()}
    path = save_ldm_checkpoint(tmp_path / "x.safetensors", tensors, {"modelspec.title": "x"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"modelspec.title": "x"}
        assert_same_tensors({key: handle.get_tensor(key) for key in handle.keys()}, tensors)


def test_save_ldm_checkpoint_rejects_non_string_metadata(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        save_ldm_checkpoint(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"steps": 3})
    assert not (tmp_path / "x.safetensors").exists()


def test_save_ldm_checkpoint_is_byte_identical_for_the_same_input(tmp_path):
    # safetensors orders metadata by hash map; we sort it so file hashes (A1111 AutoV2) are stable.
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.float16)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    first = save_ldm_checkpoint(tmp_path / "1.safetensors", tensors, metadata).read_bytes()
    for attempt in range(3):
        again = save_ldm_checkpoint(tmp_path / f"{attempt}-again.safetensors", tensors, dict(reversed(metadata.items())))
        assert again.read_bytes() == first
    with safe_open(str(tmp_path / "1.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata
        assert torch.equal(handle.get_tensor("b"), tensors["b"])
