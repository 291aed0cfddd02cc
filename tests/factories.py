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


# --- adapters: LoRA files and a tiny SDXL ----------------------------------------------------------

def _lora_targets(components: dict) -> dict[str, tuple[str, torch.nn.Linear]]:
    """Linear layers a kohya LoRA adapts: UNet attention projections and text-encoder
    self-attention / MLP projections, by kohya key prefix -> (diffusers key prefix, layer)."""
    targets = {}
    for name, module in components["unet"].named_modules():
        if isinstance(module, nn.Linear) and ".attn" in name and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0"):
            targets["lora_unet_" + name.replace(".", "_")] = ("unet." + name, module)
    for name, module in components["text_encoder"].named_modules():
        if isinstance(module, nn.Linear) and ("self_attn" in name or ".mlp." in name):
            targets["lora_te_" + name.replace(".", "_")] = ("text_encoder." + name, module)
    return targets


def tiny_lora_tensors(seed: int, rank: int = 4, alpha: float = 2.0, scale: float = 0.3,
                      components: dict | None = None) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """Random LoRA factors for the tiny-world layout: kohya prefix -> (diffusers prefix, down, up)."""
    components = components or tiny_components(0)
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for kohya, (diffusers_name, layer) in sorted(_lora_targets(components).items()):
        down = torch.randn(rank, layer.in_features, generator=generator) * scale
        up = torch.randn(layer.out_features, rank, generator=generator) * scale
        result[kohya] = (diffusers_name, down, up)
    return result


def write_tiny_lora(path, seed: int = 0, fmt: str = "kohya", rank: int = 4, alpha: float = 2.0,
                    scale: float = 0.3, metadata: dict | None = None, only: str | None = None,
                    components: dict | None = None) -> Path:
    """A random LoRA for tiny-world checkpoints, in kohya (`lora_unet_*` / `lora_te_*` with
    `.alpha`) or PEFT/diffusers format (`unet.*.lora_A/B`, alpha folded into B), so both
    formats of one seed are the same LoRA. `only` keeps "unet" or "te" layers; `components`
    (unet + text_encoder of any SD1-layout model) sizes it for that model instead."""
    from safetensors.torch import save_file

    tensors = {}
    for kohya, (diffusers_name, down, up) in tiny_lora_tensors(seed, rank, alpha, scale, components).items():
        if only == "unet" and not kohya.startswith("lora_unet_") or only == "te" and not kohya.startswith("lora_te_"):
            continue
        if fmt == "kohya":
            tensors[kohya + ".lora_down.weight"] = down.contiguous()
            tensors[kohya + ".lora_up.weight"] = up.contiguous()
            tensors[kohya + ".alpha"] = torch.tensor(alpha)
        elif fmt == "peft":
            tensors[diffusers_name + ".lora_A.weight"] = down.contiguous()
            tensors[diffusers_name + ".lora_B.weight"] = (up * (alpha / rank)).contiguous()
        else:
            raise ValueError(f"fmt must be kohya or peft, got {fmt}")
    meta = {"modelspec.architecture": TINYWORLD_ARCHITECTURE + "/lora"} if metadata is None else metadata
    path = _prepare(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def write_tiny_sdxl_checkpoint(path, seed: int = 0, text_2_width: int = 32) -> Path:
    """A tiny random SDXL pipeline as a diffusers folder (two text encoders, text_time
    embedding), small enough for CPU tests. Tokenizers are left out: Easel brings its own.
    `text_2_width`: the second encoder's hidden size; a width other than the first's (32) lets
    diffusers' single-file loader tell the two encoders apart, as it does by width in real SDXL."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build():
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
            cross_attention_dim=32 + text_2_width, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=64, scaling_factor=0.13025)
        text_config = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=32,
                           intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_config, "hidden_size": text_2_width}))
        return unet, vae, text_encoder, text_encoder_2

    from pipelines.configs import load_tokenizer

    unet, vae, text_encoder, text_encoder_2 = _seeded_build(seed, build)
    pipe = StableDiffusionXLPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(pad_with_bang=True),
        scheduler=scheduler_from_config(config_dir(Arch.SDXL)))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def write_tiny_refiner_checkpoint(path, seed: int = 0) -> Path:
    """A tiny random SDXL refiner as a diffusers folder: text_encoder_2 only, aesthetic-score
    time ids (5 values), its UNet attending to text_encoder_2 alone. Same VAE layout and latent
    space as write_tiny_sdxl_checkpoint, so base latents can be handed over."""
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def build():
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=5 * 8 + 32,
            cross_attention_dim=32, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=64, scaling_factor=0.13025)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
            hidden_act="gelu", projection_dim=32))
        return unet, vae, text_encoder_2

    from pipelines.configs import load_tokenizer

    unet, vae, text_encoder_2 = _seeded_build(seed, build)
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=None, text_encoder_2=text_encoder_2.eval(),
        tokenizer=None, tokenizer_2=load_tokenizer(pad_with_bang=True),
        scheduler=scheduler_from_config(config_dir(Arch.SDXL_REFINER)), requires_aesthetics_score=True)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def write_tiny_hypernetwork(path, seed: int = 0, widths: tuple[int, ...] = (64, 32),
                            structure: tuple[float, ...] = (1, 2, 1), activation: str = "relu",
                            layer_norm: bool = True, scale: float = 0.3) -> Path:
    """An A1111-format hypernetwork .pt (width -> [k state dict, v state dict] plus the options
    A1111 saves) for tiny-world widths: 64 = cross-attention context, 32/64 = self-attention."""
    from collections import OrderedDict

    generator = torch.Generator().manual_seed(seed)
    data: dict = {"layer_structure": list(structure), "activation_func": activation,
                  "is_layer_norm": layer_norm, "weight_initialization": "Normal", "use_dropout": False,
                  "activate_output": False, "name": Path(path).stem, "step": 0}
    for width in widths:
        pair = []
        for _ in range(2):
            state = OrderedDict()
            index = 0
            for i in range(len(structure) - 1):
                fan_in, fan_out = int(width * structure[i]), int(width * structure[i + 1])
                state[f"linear.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * scale
                state[f"linear.{index}.bias"] = torch.randn(fan_out, generator=generator) * scale
                index += 1
                if activation != "linear" and i < len(structure) - 2:
                    index += 1
                if layer_norm:
                    state[f"linear.{index}.weight"] = torch.ones(fan_out)
                    state[f"linear.{index}.bias"] = torch.zeros(fan_out)
                    index += 1
            pair.append(state)
        data[width] = pair
    path = _prepare(path)
    torch.save(data, path)
    return path


def write_tiny_sdxl_lora(path, sdxl_folder, seed: int = 0, rank: int = 4, alpha: float = 2.0,
                         scale: float = 0.3) -> Path:
    """A random kohya SDXL LoRA (`lora_unet_*`, `lora_te1_*`, `lora_te2_*`) for a checkpoint made
    by write_tiny_sdxl_checkpoint, tagged `ss_base_model_version: sdxl_base_v1-0`."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(sdxl_folder)
    modules = {"lora_unet_": UNet2DConditionModel.from_pretrained(folder / "unet"),
               "lora_te1_": CLIPTextModel.from_pretrained(folder / "text_encoder"),
               "lora_te2_": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, model in modules.items():
        for name, layer in sorted(model.named_modules()):
            if not isinstance(layer, nn.Linear):
                continue
            if prefix == "lora_unet_" and not (".attn" in name and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")):
                continue
            if prefix != "lora_unet_" and "self_attn" not in name:
                continue
            key = prefix + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * scale
            tensors[key + ".lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * scale
            tensors[key + ".alpha"] = torch.tensor(alpha)
    path = _prepare(path)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


# --- full-size SDXL layout ----------------------------------------------------------------------

SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
_OPENCLIP_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                         "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def openclip_text_to_ldm(state_dict: dict) -> dict:
    """transformers CLIPTextModelWithProjection (SDXL's text_encoder_2) -> the open_clip keys SDXL
    single files hold under `conditioner.embedders.1.model.` (no prefix): q/k/v joined into
    `attn.in_proj_*`, the projection transposed; the inverse of diffusers' open_clip conversion."""
    flat = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()
            if not key.endswith("position_ids")}
    layers = sorted({int(key.split(".")[2]) for key in flat if key.startswith("encoder.layers.")})
    converted = {}
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            converted[f"{target}attn.in_proj_{param}"] = torch.cat(
                [flat.pop(f"{source}self_attn.{p}_proj.{param}") for p in "qkv"])
            for part, ldm_part in _OPENCLIP_LAYER_PARTS.items():
                converted[f"{target}{ldm_part}.{param}"] = flat.pop(f"{source}{part}.{param}")
    converted["token_embedding.weight"] = flat.pop("embeddings.token_embedding.weight")
    converted["positional_embedding"] = flat.pop("embeddings.position_embedding.weight")
    converted["ln_final.weight"] = flat.pop("final_layer_norm.weight")
    converted["ln_final.bias"] = flat.pop("final_layer_norm.bias")
    converted["text_projection"] = flat.pop("text_projection.weight").T
    if flat:
        raise ValueError(f"Unexpected CLIP text keys {sorted(flat)[:3]}: not a CLIPTextModelWithProjection.")
    return {key: tensor.contiguous() for key, tensor in converted.items()}


def full_size_sdxl_builders(arch_dir: Path | None = None) -> dict:
    """name -> (seed offset, build function) for the SDXL base modules, from the bundled configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch_dir = _arch_dir(arch_dir, Arch.SDXL)
    if not (arch_dir / "text_encoder_2" / "config.json").is_file():
        raise ValueError(f"No SDXL diffusers config at {arch_dir}; it must hold unet/, vae/, text_encoder(_2)/.")
    unet_config = UNet2DConditionModel.load_config(arch_dir / "unet")
    vae_config = AutoencoderKL.load_config(arch_dir / "vae")
    text_config = CLIPTextConfig.from_pretrained(arch_dir / "text_encoder")
    text_2_config = CLIPTextConfig.from_pretrained(arch_dir / "text_encoder_2")
    return {"unet": (0, lambda: UNet2DConditionModel.from_config(unet_config)),
            "vae": (1, lambda: AutoencoderKL.from_config(vae_config)),
            "text_encoder": (2, lambda: CLIPTextModel(text_config)),
            "text_encoder_2": (3, lambda: CLIPTextModelWithProjection(text_2_config))}


def write_full_size_sdxl_checkpoint(path, seed: int = 0, arch_dir: Path | None = None) -> Path:
    """A random-weight fp16 single file with the real SDXL base layout and sizes (2.6B UNet,
    CLIP-L, OpenCLIP bigG, SDXL VAE), about 6.9 GB: what an A1111 user's SDXL file holds. Built
    like the SD1.5 one: on the meta device, then one model at a time allocated and filled, so
    the peak memory is about the file size. `arch_dir` swaps in other configs (tests use tiny ones)."""
    converters = {"unet": lambda m: {UNET_PREFIX + k: v for k, v in unet_to_ldm(m.state_dict(), m.config).items()},
                  "vae": lambda m: {VAE_PREFIX + k: v for k, v in vae_to_ldm(m.state_dict()).items()},
                  "text_encoder": lambda m: {SDXL_CLIP_L_PREFIX + k: v
                                             for k, v in clip_text_to_ldm(m.state_dict()).items()},
                  "text_encoder_2": lambda m: {SDXL_BIGG_PREFIX + k: v
                                               for k, v in openclip_text_to_ldm(m.state_dict()).items()}}
    state_dict = {}
    for name, (offset, build) in full_size_sdxl_builders(arch_dir).items():
        module = _materialise_fp16(build, seed + offset)
        state_dict.update(converters[name](module))
        del module  # the converted dict keeps only the tensors
    path = save_ldm_checkpoint(_prepare(path), state_dict)
    state_dict.clear()
    return path
