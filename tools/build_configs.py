"""Write the bundled diffusers config folders (no weights, no tokenizer files) for the Stable
Diffusion architectures Easel loads from single files:

    .venv/bin/python tools/build_configs.py            # rewrites pipelines/configs/<arch>/
    .venv/bin/python tools/build_configs.py --out DIR  # writes DIR/<arch>/

The values are those of the official Hub repos (stable-diffusion-v1-5, stable-diffusion-inpainting,
stabilityai/stable-diffusion-2-1-base, stable-diffusion-2-1, stable-diffusion-xl-base-1.0,
stable-diffusion-xl-refiner-1.0). Every component goes through its library class (meta device,
nothing allocated), so the JSON is complete and valid for the installed diffusers/transformers,
and a misspelt key fails the build instead of being silently dropped.

Deliberate differences from the Hub files:
- SD1/SD2 have no safety checker or feature extractor (null, requires_safety_checker false).
- SDXL pipelines never add the invisible watermark (add_watermarker false), as A1111 does not.
- Text encoders carry bos/eos ids 49406/49407 instead of the legacy 0/2. With the legacy ids
  transformers pools the text embedding at argmax(input_ids), which lands on any textual-inversion
  token added above the vocabulary; with 49407 it pools at the first <|endoftext|>, which is what
  the original models (and A1111) do and gives the same result for ordinary prompts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipelines" / "configs"

# ---- building blocks -------------------------------------------------------------------------

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 trained_betas=None)
PNDM_EPSILON = ("PNDMScheduler", dict(**_SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                                      prediction_type="epsilon"))
DDIM_EPSILON = ("DDIMScheduler", dict(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      prediction_type="epsilon"))
DDIM_V = ("DDIMScheduler", dict(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                prediction_type="v_prediction"))
EULER_SDXL = ("EulerDiscreteScheduler", dict(**_SD_BETAS, interpolation_type="linear", prediction_type="epsilon",
                                             steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False))

_FOUR = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_FOUR_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_UNET = dict(act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
                down_block_types=_FOUR, up_block_types=_FOUR_UP, downsample_padding=1, flip_sin_to_cos=True,
                freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1,
                norm_eps=1e-05, norm_num_groups=32, sample_size=64)
SD1_UNET = dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768)
SD1_INPAINT_UNET = dict(SD1_UNET, in_channels=9)  # 4 latent + 1 mask + 4 masked-image latent
SD2_UNET = dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                dual_cross_attention=False, only_cross_attention=False, num_class_embeds=None,
                upcast_attention=False)
SD2_V_UNET = dict(SD2_UNET, sample_size=96, upcast_attention=True)  # 768 px; 2.1-v overflows fp16 without upcast
_SDXL_COMMON_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                         addition_time_embed_dim=256, center_input_sample=False, downsample_padding=1,
                         flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2,
                         mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05,
                         norm_num_groups=32, sample_size=128, use_linear_projection=True)
SDXL_UNET = dict(_SDXL_COMMON_UNET, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 # pooled bigG text embedding (1280) + 6 size/crop conditions x 256
                 projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10])
SDXL_REFINER_UNET = dict(_SDXL_COMMON_UNET, attention_head_dim=[6, 12, 24, 24],
                         block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         # pooled text (1280) + size, crop and aesthetic score: 5 x 256
                         projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4)


def _vae(sample_size: int, scaling_factor: float, force_upcast: bool) -> dict:
    return dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=sample_size, scaling_factor=scaling_factor,
                force_upcast=force_upcast)


_CLIP_TEXT = dict(attention_dropout=0.0, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                  initializer_factor=1.0, initializer_range=0.02, layer_norm_eps=1e-05, max_position_embeddings=77,
                  vocab_size=49408)
CLIP_L = dict(_CLIP_TEXT, architectures=["CLIPTextModel"], hidden_act="quick_gelu", hidden_size=768,
              intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
# OpenCLIP ViT-H/14 text tower; SD2 conditions on the penultimate layer, so the last of 24 is dropped.
OPENCLIP_H = dict(_CLIP_TEXT, architectures=["CLIPTextModel"], hidden_act="gelu", hidden_size=1024,
                  intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512)
OPENCLIP_BIGG = dict(_CLIP_TEXT, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                     intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)

_NO_SAFETY = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
_SD_PARTS = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
_SDXL_PARTS = {**_SD_PARTS, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer_2": ["transformers", "CLIPTokenizer"], "feature_extractor": [None, None],
               "image_encoder": [None, None], "add_watermarker": False}


def _sd(pipeline: str, scheduler, unet: dict, vae: dict, text_encoder: dict) -> dict[str, Any]:
    return {
        "model_index": {"_class_name": pipeline, **_SD_PARTS, **_NO_SAFETY, "scheduler": ["diffusers", scheduler[0]]},
        "scheduler": scheduler, "unet": unet, "vae": vae, "text_encoder": text_encoder,
    }


SDXL_VAE = _vae(1024, 0.13025, force_upcast=True)  # the original SDXL VAE overflows in fp16

# arch folder (pipelines.arch.Arch values) -> components
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd1": _sd("StableDiffusionPipeline", PNDM_EPSILON, SD1_UNET, _vae(512, 0.18215, True), CLIP_L),
    "sd1-inpaint": _sd("StableDiffusionInpaintPipeline", DDIM_EPSILON, SD1_INPAINT_UNET, _vae(512, 0.18215, True),
                       CLIP_L),
    "sd2": _sd("StableDiffusionPipeline", PNDM_EPSILON, SD2_UNET, _vae(512, 0.18215, True), OPENCLIP_H),
    "sd2-v": _sd("StableDiffusionPipeline", DDIM_V, SD2_V_UNET, _vae(768, 0.18215, True), OPENCLIP_H),
    "sdxl": {
        "model_index": {"_class_name": "StableDiffusionXLPipeline", **_SDXL_PARTS,
                        "scheduler": ["diffusers", EULER_SDXL[0]], "force_zeros_for_empty_prompt": True},
        "scheduler": EULER_SDXL, "unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L,
        "text_encoder_2": OPENCLIP_BIGG,
    },
    "sdxl-refiner": {
        "model_index": {"_class_name": "StableDiffusionXLImg2ImgPipeline", **_SDXL_PARTS,
                        "text_encoder": [None, None], "tokenizer": [None, None],
                        "scheduler": ["diffusers", EULER_SDXL[0]], "force_zeros_for_empty_prompt": False,
                        "requires_aesthetics_score": True},
        "scheduler": EULER_SDXL, "unet": SDXL_REFINER_UNET, "vae": SDXL_VAE, "text_encoder_2": OPENCLIP_BIGG,
    },
}

# ---- writing -------------------------------------------------------------------------------------


def _init_dict(cls, values: dict) -> dict:
    """The values as the class's init arguments; unknown keys are an error, not a warning."""
    init, unused, _ = cls.extract_init_dict(dict(values))
    unknown = sorted(k for k in unused if not k.startswith("_"))
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {unknown}; fix tools/build_configs.py")
    return init


def _write_diffusers_model(cls, values: dict, folder: Path) -> None:
    import torch

    with torch.device("meta"):  # build the module to validate the config; no memory is allocated
        model = cls.from_config(_init_dict(cls, values))
    model.save_config(folder)


def _write_scheduler(spec, folder: Path) -> None:
    import diffusers

    cls = getattr(diffusers, spec[0])
    cls.from_config(_init_dict(cls, spec[1])).save_config(folder)


def _write_text_encoder(values: dict, folder: Path) -> None:
    from transformers import CLIPTextConfig

    known = set(CLIPTextConfig().to_dict())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"CLIPTextConfig does not take {unknown}; fix tools/build_configs.py")
    CLIPTextConfig(**values).save_pretrained(folder)


def _write_model_index(values: dict, folder: Path) -> None:
    import diffusers

    pipeline_cls = getattr(diffusers, values["_class_name"])
    index = {"_diffusers_version": diffusers.__version__, **values}
    _init_dict(pipeline_cls, {k: v for k, v in index.items()})
    folder.mkdir(parents=True, exist_ok=True)
    # the layout diffusers itself writes: sorted keys, two-space indent, trailing newline
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_architecture(name: str, out_root: Path) -> Path:
    """Write one architecture's config folder under out_root; returns the folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]
    folder = Path(out_root) / name
    _write_model_index(spec["model_index"], folder)
    _write_scheduler(spec["scheduler"], folder / "scheduler")
    _write_diffusers_model(UNet2DConditionModel, spec["unet"], folder / "unet")
    _write_diffusers_model(AutoencoderKL, spec["vae"], folder / "vae")
    for part in ("text_encoder", "text_encoder_2"):
        if part in spec:
            _write_text_encoder(spec[part], folder / part)
    return folder


def build(out_root: Path, names: list[str] | None = None) -> list[Path]:
    return [write_architecture(name, out_root) for name in (names or list(ARCHITECTURES))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder that receives one folder per arch")
    parser.add_argument("arch", nargs="*", help=f"architectures to write (default: all of {list(ARCHITECTURES)})")
    args = parser.parse_args(argv)
    for folder in build(args.out, args.arch or None):
        print(folder)


if __name__ == "__main__":
    main()
