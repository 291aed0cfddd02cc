"""Tiny ControlNets for tests, made from a UNet with `ControlNetModel.from_unet` and given
non-zero random zero-convolutions (a fresh ControlNet outputs exact zeros, so it could not show
that weights, guidance and modes do anything). Saved as users get them: one single file in the
lllyasviel/A1111 LDM key layout (`control_model.*`), or in the diffusers key layout."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from pipelines.ldm_convert import unet_to_ldm


def tiny_controlnet(unet, seed: int = 0, zero_conv_std: float = 0.05, family: str = "tinyworld",
                    hint: tuple[int, ...] | None = None):
    """`hint`: the control-image encoder's channels, one stride-2 step per VAE downsampling
    (default: those of the bundled config of `family`)."""
    from diffusers import ControlNetModel

    from pipelines.control.models import config_dir

    hint = hint or ControlNetModel.load_config(config_dir(family))["conditioning_embedding_out_channels"]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * zero_conv_std)
    return controlnet.eval()


def controlnet_to_ldm(controlnet) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel -> `control_model.*` keys as lllyasviel's files hold them."""
    state = controlnet.state_dict()
    shared = {k: v for k, v in state.items() if not k.startswith(("controlnet_", "controlnet_cond_embedding"))}
    # unet_to_ldm needs a whole UNet's layout; a ControlNet is its encoder half.
    config = dict(controlnet.config) | {"up_block_types": ["UpBlock2D"] * len(controlnet.config.down_block_types)}
    out = {f"control_model.{k}": v for k, v in unet_to_ldm(shared, config).items()}
    for key, tensor in state.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            match = re.fullmatch(r"blocks\.(\d+)\.(weight|bias)", rest)
            if match:
                ldm = f"input_hint_block.{2 * (int(match.group(1)) + 1)}.{match.group(2)}"
            else:
                part, param = rest.split(".")
                # conv_out sits at 14 in lllyasviel's files; diffusers' reader expects it there
                ldm = f"input_hint_block.{0 if part == 'conv_in' else 14}.{param}"
        elif key.startswith("controlnet_down_blocks."):
            _, index, param = key.split(".")
            ldm = f"zero_convs.{index}.0.{param}"
        elif key.startswith("controlnet_mid_block."):
            ldm = f"middle_block_out.0.{key.rsplit('.', 1)[1]}"
        else:
            continue
        out[f"control_model.{ldm}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def write_controlnet(path: Path, controlnet, layout: str = "ldm") -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = controlnet_to_ldm(controlnet) if layout == "ldm" else {
        k: v.contiguous() for k, v in controlnet.state_dict().items()}
    save_file(state, str(path))
    return path


def write_tiny_image_encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIP vision encoder with projection (32 px, 32-dim embeddings) as a diffusers
    image_encoder folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(folder)
    return Path(folder)


def tiny_ip_adapter_state(unet, embed_dim: int = 32, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """An h94-layout IP-Adapter (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip`) for `unet`:
    N counts 1, 3, 5, ... over the cross-attention processors, as diffusers reads it."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    channels = list(unet.config.block_out_channels)

    def rand(*shape):
        return torch.randn(shape, generator=generator) * std

    state = {"image_proj.proj.weight": rand(cross * 4, embed_dim), "image_proj.proj.bias": torch.zeros(cross * 4),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    return state


def write_tiny_ip_adapter(models_dir: Path, unet, name: str = "ip-adapter_tiny.safetensors", seed: int = 0,
                          folder: str = "ipadapter") -> Path:
    """models/<folder>/<name> and models/<folder>/image_encoder/ (folder: ipadapter or ControlNet)."""
    from safetensors.torch import save_file

    folder = Path(models_dir) / folder
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "image_encoder" / "config.json").is_file():
        write_tiny_image_encoder(folder / "image_encoder", seed=seed)
    path = folder / name
    save_file({k: v.contiguous() for k, v in tiny_ip_adapter_state(unet, seed=seed).items()}, str(path))
    return path


def tiny_t2i_adapter(unet, seed: int = 0, in_channels: int = 3, downscale_factor: int = 4):
    """A random T2I-Adapter whose features fit `unet`'s down blocks (tiny-world: factor-4 VAE)."""
    from diffusers import T2IAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T2IAdapter(in_channels=in_channels, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                          downscale_factor=downscale_factor, adapter_type="full_adapter").eval()


def t2i_adapter_to_original(adapter) -> dict[str, torch.Tensor]:
    """diffusers `adapter.*` -> TencentARC's flat `conv_in.*`, `body.K.*` layout."""
    per_level = adapter.config.num_res_blocks
    out = {}
    for key, tensor in adapter.state_dict().items():
        rest = key[len("adapter."):]
        match = re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if match:
            rest = f"body.{int(match.group(1)) * per_level + int(match.group(2))}.{match.group(3)}"
        else:
            match = re.fullmatch(r"body\.(\d+)\.in_conv\.(.+)", rest)
            if match:
                rest = f"body.{int(match.group(1)) * per_level}.in_conv.{match.group(2)}"
        out[rest] = tensor.contiguous()
    return out


def write_t2i_adapter(path: Path, adapter, layout: str = "diffusers") -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = t2i_adapter_to_original(adapter) if layout == "original" else {
        k: v.contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, str(path))
    return path


def tiny_gligen_state(unet, text_hidden: int, seed: int = 0, gate: float = 3.0, ldm_names: bool = True):
    """A random GLIGEN file for `unet`: position net + one fuser per transformer block, with open
    gates (a trained GLIGEN's are non-zero; fresh ones are 0 and would change nothing)."""
    from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    from pipelines.control.gligen import _ldm_block_names

    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        position = GLIGENTextBoundingboxProjection(positive_len=text_hidden, out_dim=unet.config.cross_attention_dim)
        state |= {f"position_net.{k}": v for k, v in position.state_dict().items()}
        blocks = {n: m for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}
        names = _ldm_block_names(unet, list(blocks)) if ldm_names else {n: n for n in blocks}
        for name, block in blocks.items():
            dim, heads = block.attn1.query_dim, block.attn1.heads
            fuser = GatedSelfAttentionDense(dim, unet.config.cross_attention_dim, heads, dim // heads)
            with torch.no_grad():
                fuser.alpha_attn.fill_(gate)
                fuser.alpha_dense.fill_(gate)
                for layer in (fuser.attn.to_out[0], fuser.ff.net[2]):  # louder than the default init
                    layer.weight.mul_(8)
            prefix = ("model.diffusion_model." if ldm_names else "") + names[name]
            state |= {f"{prefix}.fuser.{k}": v for k, v in fuser.state_dict().items()}
    return {k: v.contiguous() for k, v in state.items()}


def write_tiny_gligen(models_dir: Path, unet, text_hidden: int, name: str = "gligen_tiny.safetensors") -> Path:
    from safetensors.torch import save_file

    path = Path(models_dir) / "gligen" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_gligen_state(unet, text_hidden), str(path))
    return path


# --- real-layout key lists (for header-only files) ----------------------------------------------

# lllyasviel's cldm ControlNet per base family: channels per level, transformer depth per level
# (0: no attention), mid-block depth, text context width, linear projections, SDXL label_emb width.
LDM_FAMILIES = {
    "sd1": dict(channels=(320, 640, 1280, 1280), depths=(1, 1, 1, 0), mid_depth=1, context=768, linear=False,
                label=None),
    "sd2": dict(channels=(320, 640, 1280, 1280), depths=(1, 1, 1, 0), mid_depth=1, context=1024, linear=True,
                label=None),
    "sdxl": dict(channels=(320, 640, 1280), depths=(0, 2, 10), mid_depth=10, context=2048, linear=True, label=2816),
}
HINT_CHANNELS = (16, 32, 96, 256)


def ldm_controlnet_layout(family: str, prefix: str = "control_model.") -> dict[str, tuple[int, ...]]:
    """Key -> shape of a `control_v11p_sd15_canny`-style single file (LDM names), written from the
    published ControlNet architecture (UNet encoder + hint block + zero convolutions), not from
    any converter, so a converter can be checked against it."""
    spec = LDM_FAMILIES[family]
    channels, context, linear = spec["channels"], spec["context"], spec["linear"]
    base, emb = channels[0], channels[0] * 4
    out: dict[str, tuple[int, ...]] = {}

    def add(key: str, *shape: int, bias: bool = True) -> None:
        out[f"{prefix}{key}.weight"] = shape
        if bias:
            out[f"{prefix}{key}.bias"] = (shape[0],)

    def resblock(at: str, cin: int, cout: int) -> None:
        add(f"{at}.in_layers.0", cin)
        add(f"{at}.in_layers.2", cout, cin, 3, 3)
        add(f"{at}.emb_layers.1", cout, emb)
        add(f"{at}.out_layers.0", cout)
        add(f"{at}.out_layers.3", cout, cout, 3, 3)
        if cin != cout:
            add(f"{at}.skip_connection", cout, cin, 1, 1)

    def transformer(at: str, c: int, depth: int) -> None:
        add(f"{at}.norm", c)
        add(f"{at}.proj_in", *((c, c) if linear else (c, c, 1, 1)))
        for t in range(depth):
            block = f"{at}.transformer_blocks.{t}"
            for attn, kv in (("attn1", c), ("attn2", context)):
                add(f"{block}.{attn}.to_q", c, c, bias=False)
                add(f"{block}.{attn}.to_k", c, kv, bias=False)
                add(f"{block}.{attn}.to_v", c, kv, bias=False)
                add(f"{block}.{attn}.to_out.0", c, c)
            add(f"{block}.ff.net.0.proj", 8 * c, c)
            add(f"{block}.ff.net.2", c, 4 * c)
            for norm in ("norm1", "norm2", "norm3"):
                add(f"{block}.{norm}", c)
        add(f"{at}.proj_out", *((c, c) if linear else (c, c, 1, 1)))

    add("time_embed.0", emb, base)
    add("time_embed.2", emb, emb)
    if spec["label"]:
        add("label_emb.0.0", emb, spec["label"])
        add("label_emb.0.2", emb, emb)
    hint = [3] + [c for c in HINT_CHANNELS for _ in (0, 1)][:-1]  # 3, 16, 16, 32, 32, 96, 96, 256
    for index, (cin, cout) in enumerate(zip(hint[:-1], hint[1:])):
        add(f"input_hint_block.{2 * index}", cout, cin, 3, 3)
    add("input_hint_block.14", base, HINT_CHANNELS[-1], 3, 3)
    add("input_blocks.0.0", base, 4, 3, 3)
    block_channels, cin, block = [base], base, 1
    for level, (cout, depth) in enumerate(zip(channels, spec["depths"])):
        for _ in range(2):
            resblock(f"input_blocks.{block}.0", cin, cout)
            if depth:
                transformer(f"input_blocks.{block}.1", cout, depth)
            block_channels.append(cout)
            cin, block = cout, block + 1
        if level < len(channels) - 1:
            add(f"input_blocks.{block}.0.op", cout, cout, 3, 3)
            block_channels.append(cout)
            block += 1
    for index, c in enumerate(block_channels):
        add(f"zero_convs.{index}.0", c, c, 1, 1)
    resblock("middle_block.0", cin, cin)
    transformer("middle_block.1", cin, spec["mid_depth"])
    resblock("middle_block.2", cin, cin)
    add("middle_block_out.0", cin, cin, 1, 1)
    return out
