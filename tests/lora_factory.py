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
