"""Tiny kohya-format LoRAs for tests: random low-rank modules on tiny-world layers, saved with
the key names A1111 / kohya trainers write (`lora_unet_*`, `lora_te_*`)."""
from pathlib import Path

import torch

# Linear, 1x1-conv and 3x3-conv targets in the UNet plus one text-encoder projection.
TINYWORLD_LORA_MODULES = (
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet:down_blocks.0.attentions.0.proj_in",
    "unet:mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet:down_blocks.1.resnets.0.conv1",
    "te:text_model.encoder.layers.0.self_attn.q_proj",
    # diffusers recognises a kohya text-encoder LoRA by its out_proj module: real ones have it
    "te:text_model.encoder.layers.0.self_attn.out_proj",
)


def _module_shapes() -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.arch import Arch
    from pipelines.configs import config_dir

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir(Arch.TINYWORLD) / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir(Arch.TINYWORLD) / "text_encoder"))
    shapes = {f"unet:{k[:-7]}": tuple(v.shape) for k, v in unet.state_dict().items() if k.endswith(".weight")}
    text_state = text.state_dict()
    for k, v in text_state.items():
        if k.endswith(".weight"):
            name = k[:-7] if k.startswith("text_model.") else "text_model." + k[:-7]
            shapes[f"te:{name}"] = tuple(v.shape)
    return shapes


def write_tiny_kohya_lora(path, seed: int = 0, rank: int = 4, alpha: float = 2.0, scale: float = 0.3,
                          modules=TINYWORLD_LORA_MODULES) -> Path:
    from safetensors.torch import save_file

    shapes = _module_shapes()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        part, name = module.split(":", 1)
        shape = shapes[module]
        kohya = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
        out_features, in_features = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 else ()
        down = torch.randn((rank, in_features, *kernel), generator=generator) * scale
        up = torch.randn((out_features, rank, *([1, 1] if kernel else [])), generator=generator) * scale
        state[f"{kohya}.lora_down.weight"] = down
        state[f"{kohya}.lora_up.weight"] = up
        state[f"{kohya}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                          "ss_network_alpha": str(alpha)})
    return path


# Convolution layers of tiny-world's UNet (3x3 resnet convolutions and a 1x1 shortcut): a kohya
# LoRA on these is what LyCORIS calls LoCon.
TINYWORLD_CONV_MODULES = (
    "unet:down_blocks.0.resnets.0.conv1",
    "unet:down_blocks.1.resnets.0.conv1",
    "unet:down_blocks.1.resnets.0.conv2",
    "unet:down_blocks.1.resnets.0.conv_shortcut",
    "unet:up_blocks.0.resnets.0.conv2",
)


# What the tiny LyCORIS files adapt: the LoRA targets and the convolutions, each once.
TINYWORLD_LYCORIS_MODULES = tuple(dict.fromkeys(TINYWORLD_LORA_MODULES + TINYWORLD_CONV_MODULES))


def _kohya_name(module: str) -> str:
    part, name = module.split(":", 1)
    return ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")


def _two_factors(n: int) -> tuple[int, int]:
    """n = a * b with a <= b as close as possible (LyCORIS' `factorization(n, -1)`)."""
    a = int(n ** 0.5)
    while n % a:
        a -= 1
    return a, n // a


def write_tiny_lycoris(path, algo: str, seed: int = 0, rank: int = 2, alpha: float = 1.0, scale: float = 0.5,
                       modules=TINYWORLD_LYCORIS_MODULES, full_w2: tuple[str, ...] = ()) -> Path:
    """A random LyCORIS file for tiny-world with the key names LyCORIS writes: LoHa
    (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, convolution kernels flattened into the
    `_b` factors) or LoKr (`lokr_w1` and `lokr_w2_a` / `lokr_w2_b`, or a full `lokr_w2` for the
    modules in `full_w2`: (c, d) for linear layers, (c, d, kh, kw) for convolutions)."""
    from safetensors.torch import save_file

    shapes = _module_shapes()
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=generator) * scale

    state = {}
    for module in modules:
        shape = shapes[module]
        key = _kohya_name(module)
        out_features, in_features, kernel = shape[0], shape[1], tuple(shape[2:])
        flat_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
        if algo == "loha":
            state |= {f"{key}.hada_w1_a": rand(out_features, rank), f"{key}.hada_w1_b": rand(rank, flat_in),
                      f"{key}.hada_w2_a": rand(out_features, rank), f"{key}.hada_w2_b": rand(rank, flat_in)}
        elif algo == "lokr":
            (a, c), (b, d) = _two_factors(out_features), _two_factors(in_features)
            state[f"{key}.lokr_w1"] = rand(a, b)
            if module in full_w2:
                state[f"{key}.lokr_w2"] = rand(c, d, *kernel)
            else:
                state[f"{key}.lokr_w2_a"] = rand(c, rank)
                state[f"{key}.lokr_w2_b"] = rand(rank, d * (kernel[0] * kernel[1] if kernel else 1))
        else:
            raise ValueError(f"algo must be loha or lokr, got {algo}")
        state[f"{key}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya",
                                          "ss_network_args": '{"algo": "%s"}' % algo})
    return path


def lycoris_delta(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight update of one module, computed the way A1111's network_hada / network_lokr do
    (an independent reference for the conversion Easel makes)."""
    t = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.startswith(key + ".")}
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (delta * (t["alpha"].item() / t["hada_w1_b"].shape[0])).reshape(shape)
    w1 = t["lokr_w1"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    factor = t["alpha"].item() / t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else 1.0
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * factor).reshape(shape)
