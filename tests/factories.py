"""Model factories for tests: tiny random diffusers components and the single-file checkpoints
users bring (LDM / A1111 key layout), written with pipelines.ldm_convert.

Everything is CPU, deterministic per seed and leaves the global torch RNG untouched.
"""
import json
import math
from pathlib import Path

import torch
from torch import nn

from pipelines.arch import Arch
from pipelines.configs import config_dir
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

TINYWORLD_ARCHITECTURE = "easel/tiny-world-v1"


def _arch_dir(arch_dir: Path | None, arch: Arch = Arch.TINYWORLD) -> Path:
    return Path(arch_dir) if arch_dir is not None else config_dir(arch)


def _seeded_build(seed: int, build):
    """Run build() with the torch RNG seeded, without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet(seed: int = 0, arch_dir: Path | None = None):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(_arch_dir(arch_dir) / "unet")
    return _seeded_build(seed, lambda: UNet2DConditionModel.from_config(config)).eval()


def tiny_vae(seed: int = 0, arch_dir: Path | None = None):
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(_arch_dir(arch_dir) / "vae")
    return _seeded_build(seed, lambda: AutoencoderKL.from_config(config)).eval()


def tiny_text_encoder(seed: int = 0, arch_dir: Path | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(_arch_dir(arch_dir) / "text_encoder")
    return _seeded_build(seed, lambda: CLIPTextModel(config)).eval()


def scheduler_from_config(arch_dir: Path | None = None):
    import diffusers

    config = json.loads((_arch_dir(arch_dir) / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)


def tiny_components(seed: int = 0, arch_dir: Path | None = None) -> dict:
    """Random-initialised `unet`, `vae`, `text_encoder` and the `scheduler` of the tiny-world
    configs (or of `arch_dir`). Each model is seeded with `seed` on its own, so
    write_tiny_vae(seed=s) holds the same VAE as tiny_components(seed=s)."""
    return {
        "unet": tiny_unet(seed, arch_dir),
        "vae": tiny_vae(seed, arch_dir),
        "text_encoder": tiny_text_encoder(seed, arch_dir),
        "scheduler": scheduler_from_config(arch_dir),
    }


def tiny_checkpoint_metadata(seed: int = 0) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": TINYWORLD_ARCHITECTURE,
        "modelspec.title": f"tiny-world test model (seed {seed})",
        "modelspec.resolution": "64x64",
    }


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_tiny_checkpoint(path, seed: int = 0, metadata: dict | None = None) -> Path:
    """A single-file tiny-world checkpoint in the LDM layout with modelspec metadata; `metadata`
    adds to (or overrides) the modelspec keys."""
    components = tiny_components(seed)
    state_dict = pipeline_to_ldm(components["unet"], components["vae"], components["text_encoder"])
    return save_ldm_checkpoint(_prepare(path), state_dict, {**tiny_checkpoint_metadata(seed), **(metadata or {})})


def write_tiny_vae(path, seed: int = 1) -> Path:
    """A standalone tiny-world VAE file with un-prefixed LDM keys (`encoder.*`, `decoder.*`,
    `quant_conv.*`, `post_quant_conv.*`), as A1111's models/VAE holds them."""
    return save_ldm_checkpoint(_prepare(path), vae_to_ldm(tiny_vae(seed).state_dict()))


# --- full-size SD1.5 layout -------------------------------------------------------------------


def _random_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Fill freshly allocated weights: norms as identity, biases zero, other weights uniform in
    +-1/sqrt(fan_in) (PyTorch's default scale), so outputs stay finite."""
    for child in module.modules():
        is_norm = isinstance(child, (nn.GroupNorm, nn.LayerNorm))
        for name, param in child.named_parameters(recurse=False):
            with torch.no_grad():
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif param.ndim >= 2:
                    bound = 1.0 / math.sqrt(param[0].numel())
                    param.uniform_(-bound, bound, generator=generator)
                else:
                    param.zero_()


def _materialise_fp16(build, seed: int) -> nn.Module:
    """Build on the meta device (no memory), then allocate fp16 weights once and fill them."""
    with torch.device("meta"):
        module = build()
    module = module.half().to_empty(device="cpu")
    persistent_buffers = set(module.state_dict()) - {name for name, _ in module.named_parameters()}
    if persistent_buffers:
        raise ValueError(f"{type(module).__name__} has buffers this factory does not fill: {persistent_buffers}")
    _random_init_(module, torch.Generator().manual_seed(seed))
    return module.eval()


def write_full_size_sd15_checkpoint(path, seed: int = 0, arch_dir: Path | None = None) -> Path:
    """A random-weight fp16 single file with the real SD1.5 layout and sizes (860M UNet, CLIP-L,
    SD VAE), about 2 GB. Models are allocated one at a time in fp16 and converted to views, so
    the peak memory is about the file size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch_dir = _arch_dir(arch_dir, Arch.SD1)
    if not (arch_dir / "unet" / "config.json").is_file():
        raise ValueError(f"No SD1 diffusers config at {arch_dir}; it must hold unet/, vae/ and text_encoder/.")
    unet_config = UNet2DConditionModel.load_config(arch_dir / "unet")
    vae_config = AutoencoderKL.load_config(arch_dir / "vae")
    text_config = CLIPTextConfig.from_pretrained(arch_dir / "text_encoder")

    state_dict = {}
    unet = _materialise_fp16(lambda: UNet2DConditionModel.from_config(unet_config), seed)
    state_dict.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()})
    del unet  # the converted dict keeps only the tensors
    vae = _materialise_fp16(lambda: AutoencoderKL.from_config(vae_config), seed + 1)
    state_dict.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict()).items()})
    del vae
    text_encoder = _materialise_fp16(lambda: CLIPTextModel(text_config), seed + 2)
    state_dict.update({CLIP_PREFIX + k: v for k, v in clip_text_to_ldm(text_encoder.state_dict()).items()})
    del text_encoder

    path = save_ldm_checkpoint(_prepare(path), state_dict)
    state_dict.clear()
    return path
