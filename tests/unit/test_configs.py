"""The bundled diffusers config folders: they load with the library classes, describe the official
models (parameter counts on the meta device, nothing allocated) and match their generator."""
import json
from pathlib import Path

import pytest
import torch

from pipelines import configs
from pipelines.arch import Arch
from tools import build_configs

FULL_SIZE = [Arch.SD1, Arch.SD1_INPAINT, Arch.SD2, Arch.SD2_V, Arch.SDXL, Arch.SDXL_REFINER]
VERSION_KEYS = {"_diffusers_version", "transformers_version"}

# Parameter counts of the official models (diffusers / transformers layouts).
SD1_UNET_PARAMS = 859_520_964
SD2_UNET_PARAMS = 865_910_724
SDXL_UNET_PARAMS = 2_567_463_684
VAE_PARAMS = 83_653_863
CLIP_L_PARAMS = 123_060_480
OPENCLIP_H_23_LAYER_PARAMS = 340_387_840
OPENCLIP_BIGG_WITH_PROJECTION_PARAMS = 694_659_840


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_unet(arch: Arch):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(configs.config_dir(arch) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert next(unet.parameters()).device.type == "meta"
    return unet


def _meta_text_encoder(arch: Arch, part: str):
    import transformers

    config = transformers.CLIPTextConfig.from_pretrained(configs.config_dir(arch) / part)
    model_cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        return model_cls(config)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_config_dir_for_every_known_arch():
    for arch in Arch:
        if arch is Arch.UNKNOWN:
            continue
        folder = configs.config_dir(arch)
        assert folder.name == arch.value
        assert (folder / "model_index.json").is_file()
    assert configs.config_dir("sdxl") == configs.config_dir(Arch.SDXL)


def test_config_dir_rejects_unknown():
    with pytest.raises(ValueError, match="unknown architecture"):
        configs.config_dir(Arch.UNKNOWN)


@pytest.mark.parametrize("arch", FULL_SIZE, ids=lambda a: a.value)
def test_folder_loads_with_the_library_classes(arch):
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    folder = configs.config_dir(arch)
    index = DiffusionPipeline.load_config(folder)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    _, unused, _ = pipeline_cls.extract_init_dict(dict(index))
    assert not [k for k in unused if not k.startswith("_")], f"keys {pipeline_cls.__name__} does not take"

    components = {k: v for k, v in index.items() if isinstance(v, list) and len(v) == 2 and not k.startswith("_")}
    present = {k for k, (library, _) in components.items() if library is not None}
    tokenizers = {k for k in present if k.startswith("tokenizer")}
    expected_folders = present - tokenizers
    assert {p.name for p in folder.iterdir() if p.is_dir()} == expected_folders
    for name in sorted(expected_folders):
        library, class_name = components[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if library == "diffusers":
            config = cls.load_config(folder / name)
            assert config["_class_name"] == class_name
        else:
            config = cls.config_class.from_pretrained(folder / name)
            assert config.architectures == [class_name]
    # configs only: no weights, no tokenizer files
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".json"}


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD1_INPAINT, Arch.SD2, Arch.SD2_V], ids=lambda a: a.value)
def test_sd1_sd2_have_no_safety_checker(arch):
    index = _json(configs.config_dir(arch) / "model_index.json")
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_unet_parameter_counts_on_meta_device():
    assert _count(_meta_unet(Arch.SD1)) == SD1_UNET_PARAMS
    # the inpainting conv_in takes 5 more channels: 5 x 320 x 3 x 3 more weights
    assert _count(_meta_unet(Arch.SD1_INPAINT)) == SD1_UNET_PARAMS + 5 * 320 * 9
    assert _count(_meta_unet(Arch.SD2)) == SD2_UNET_PARAMS
    assert _count(_meta_unet(Arch.SD2_V)) == SD2_UNET_PARAMS
    assert _count(_meta_unet(Arch.SDXL)) == SDXL_UNET_PARAMS
    assert 2.2e9 < _count(_meta_unet(Arch.SDXL_REFINER)) < 2.35e9


@pytest.mark.parametrize("arch, in_channels, cross_attention_dim, sample_size", [
    (Arch.SD1, 4, 768, 64), (Arch.SD1_INPAINT, 9, 768, 64), (Arch.SD2, 4, 1024, 64), (Arch.SD2_V, 4, 1024, 96),
    (Arch.SDXL, 4, 2048, 128), (Arch.SDXL_REFINER, 4, 1280, 128),
], ids=lambda v: getattr(v, "value", str(v)))
def test_unet_shapes(arch, in_channels, cross_attention_dim, sample_size):
    unet = _json(configs.config_dir(arch) / "unet" / "config.json")
    assert (unet["in_channels"], unet["cross_attention_dim"], unet["sample_size"]) == (
        in_channels, cross_attention_dim, sample_size)


def test_sdxl_unet_conditioning_sizes():
    base = _json(configs.config_dir(Arch.SDXL) / "unet" / "config.json")
    refiner = _json(configs.config_dir(Arch.SDXL_REFINER) / "unet" / "config.json")
    # pooled text embedding 1280 + 256 per micro-condition: 6 (sizes, crop) / 5 (+ aesthetic score)
    assert base["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert refiner["projection_class_embeddings_input_dim"] == 1280 + 5 * 256


@pytest.mark.parametrize("arch", FULL_SIZE, ids=lambda a: a.value)
def test_vae(arch):
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(configs.config_dir(arch) / "vae")
    assert config["scaling_factor"] == arch.vae_scaling_factor
    assert config["scaling_factor"] == (0.13025 if arch.is_sdxl else 0.18215)
    assert config["force_upcast"] is True
    with torch.device("meta"):
        assert _count(AutoencoderKL.from_config(config)) == VAE_PARAMS


@pytest.mark.parametrize("arch, scheduler_class, prediction_type", [
    (Arch.SD1, "PNDMScheduler", "epsilon"), (Arch.SD1_INPAINT, "DDIMScheduler", "epsilon"),
    (Arch.SD2, "PNDMScheduler", "epsilon"), (Arch.SD2_V, "DDIMScheduler", "v_prediction"),
    (Arch.SDXL, "EulerDiscreteScheduler", "epsilon"), (Arch.SDXL_REFINER, "EulerDiscreteScheduler", "epsilon"),
], ids=lambda v: getattr(v, "value", str(v)))
def test_scheduler(arch, scheduler_class, prediction_type):
    import diffusers

    folder = configs.config_dir(arch)
    cls = getattr(diffusers, scheduler_class)
    scheduler = cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert type(scheduler) is cls
    assert scheduler.config.prediction_type == prediction_type
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule) == (
        0.00085, 0.012, "scaled_linear")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.steps_offset == 1
    assert _json(folder / "model_index.json")["scheduler"] == ["diffusers", scheduler_class]


@pytest.mark.parametrize("arch, part, hidden, layers, act, params", [
    (Arch.SD1, "text_encoder", 768, 12, "quick_gelu", CLIP_L_PARAMS),
    (Arch.SD1_INPAINT, "text_encoder", 768, 12, "quick_gelu", CLIP_L_PARAMS),
    (Arch.SD2, "text_encoder", 1024, 23, "gelu", OPENCLIP_H_23_LAYER_PARAMS),
    (Arch.SD2_V, "text_encoder", 1024, 23, "gelu", OPENCLIP_H_23_LAYER_PARAMS),
    (Arch.SDXL, "text_encoder", 768, 12, "quick_gelu", CLIP_L_PARAMS),
    (Arch.SDXL, "text_encoder_2", 1280, 32, "gelu", OPENCLIP_BIGG_WITH_PROJECTION_PARAMS),
    (Arch.SDXL_REFINER, "text_encoder_2", 1280, 32, "gelu", OPENCLIP_BIGG_WITH_PROJECTION_PARAMS),
], ids=lambda v: getattr(v, "value", str(v)))
def test_text_encoders(arch, part, hidden, layers, act, params):
    model = _meta_text_encoder(arch, part)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (hidden, layers, act)
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    # pool at the first <|endoftext|>, not at argmax(input_ids) (legacy eos id 2)
    assert (config.bos_token_id, config.eos_token_id) == (49406, 49407)
    assert _count(model) == params
    if part == "text_encoder_2":
        assert type(model).__name__ == "CLIPTextModelWithProjection" and config.projection_dim == 1280


def test_sdxl_pipelines():
    base = _json(configs.config_dir(Arch.SDXL) / "model_index.json")
    refiner = _json(configs.config_dir(Arch.SDXL_REFINER) / "model_index.json")
    assert base["_class_name"] == "StableDiffusionXLPipeline"
    assert base["tokenizer"] == base["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert base["force_zeros_for_empty_prompt"] is True and base["add_watermarker"] is False
    assert refiner["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner["text_encoder"] == refiner["tokenizer"] == [None, None]
    assert refiner["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert refiner["requires_aesthetics_score"] is True and refiner["add_watermarker"] is False
    assert not (configs.config_dir(Arch.SDXL_REFINER) / "text_encoder").exists()


def _tree(root: Path) -> dict[str, dict]:
    """Relative path -> JSON content without library version stamps."""
    return {str(p.relative_to(root)): {k: v for k, v in _json(p).items() if k not in VERSION_KEYS}
            for p in sorted(root.rglob("*.json"))}


def test_generator_reproduces_committed_configs(tmp_path):
    build_configs.build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(a.value for a in FULL_SIZE)
    for arch in FULL_SIZE:
        assert _tree(tmp_path / arch.value) == _tree(configs.config_dir(arch)), arch.value


def test_generator_covers_every_full_size_arch():
    assert sorted(build_configs.ARCHITECTURES) == sorted(a.value for a in FULL_SIZE)


def test_generator_rejects_misspelt_keys(tmp_path, monkeypatch):
    broken = dict(build_configs.ARCHITECTURES["sd1"], unet=dict(build_configs.SD1_UNET, cross_attn_dim=768))
    monkeypatch.setitem(build_configs.ARCHITECTURES, "sd1", broken)
    with pytest.raises(ValueError, match="cross_attn_dim"):
        build_configs.write_architecture("sd1", tmp_path)


@pytest.mark.parametrize("arch", FULL_SIZE, ids=lambda a: a.value)
def test_from_single_file_accepts_the_folder_offline(arch, tmp_path):
    """What the loaders do: `config=` our folder, our tokenizers, no safety checker. All models are
    passed in (meta device), so only the scheduler and the pipeline options come from the folder."""
    import diffusers
    import transformers
    from safetensors.torch import save_file

    folder = configs.config_dir(arch)
    checkpoint = tmp_path / "model.safetensors"
    save_file({"unused": torch.zeros(1)}, str(checkpoint))
    parts = {"unet": _meta_unet(arch)}
    with torch.device("meta"):
        parts["vae"] = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae"))
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():
            parts[name] = _meta_text_encoder(arch, name)
    if arch is Arch.SDXL_REFINER:
        parts["tokenizer_2"] = configs.load_tokenizer(pad_with_bang=True)
    elif arch is Arch.SDXL:
        parts.update(tokenizer=configs.load_tokenizer(), tokenizer_2=configs.load_tokenizer(pad_with_bang=True))
    else:
        parts.update(tokenizer=configs.load_tokenizer(), safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
    pipeline_cls = diffusers.StableDiffusionXLPipeline if arch is Arch.SDXL else getattr(
        diffusers, _json(folder / "model_index.json")["_class_name"])

    pipe = pipeline_cls.from_single_file(str(checkpoint), config=str(folder), local_files_only=True, **parts)

    assert pipe.unet is parts["unet"]
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if arch is Arch.SD2_V else "epsilon")
    if arch.is_sdxl:
        assert pipe.watermark is None
        assert pipe.config.force_zeros_for_empty_prompt is (arch is Arch.SDXL)
        if arch is Arch.SDXL_REFINER:
            assert pipe.config.requires_aesthetics_score is True
        assert pipe.tokenizer_2.pad_token_id == 0
        assert isinstance(pipe.text_encoder_2, transformers.CLIPTextModelWithProjection)
