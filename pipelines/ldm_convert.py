"""Diffusers -> original LDM (A1111 single-file) key layout.

The inverse of diffusers' `loaders/single_file_utils.py` conversion, so tests and the tiny-world
trainer can write the checkpoints users actually bring. The UNet numbering is derived from the
diffusers config (blocks, layers per block, which blocks have attention), not from a fixed table,
so the same code covers the tiny-world model and the SD1/SD2/SDXL sizes.

LDM UNet numbering, with L = layers_per_block:
  input_blocks.0            conv_in
  input_blocks.1+b*(L+1)+j  down block b, layer j: `.0` resnet, `.1` attention
  input_blocks.1+b*(L+1)+L  down block b's downsampler (`.0.op`)
  middle_block.0/.1/.2      resnet, attention, resnet
  output_blocks.b*(L+1)+j   up block b, layer j (up blocks have L+1 layers): `.0` resnet,
                            `.1` attention, upsampler on the last layer at `.1` (no attention)
                            or `.2` (after the attention)
"""
import json
import re
from pathlib import Path

import torch

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's size/crop conditioning and class-conditioned UNets share the LDM `label_emb` slot.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",
}

UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

VAE_TOP_LEVEL = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}

VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}

VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

CLIP_TEXT_MODEL_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_BLOCK_LAYER = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)")
_MID_LAYER = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_VAE_SAMPLER = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _split_part(suffix: str, parts: dict[str, str]) -> tuple[str, str] | None:
    """('conv1', 'weight') for 'conv1.weight' when 'conv1' is a known part, else None."""
    for diffusers_part, ldm_part in parts.items():
        if suffix.startswith(diffusers_part + "."):
            return ldm_part, suffix[len(diffusers_part) + 1:]
    return None


def _rename_top_level(key: str, table: dict[str, str]) -> str | None:
    module, _, param = key.rpartition(".")
    if module in table:
        return f"{table[module]}.{param}"
    return None


def _resnet_key(ldm_block: str, suffix: str, key: str) -> str:
    split = _split_part(suffix, UNET_RESNET_PARTS)
    if split is None:
        raise ValueError(f"Unexpected UNet resnet key {key!r}: not a diffusers ResnetBlock2D parameter.")
    return f"{ldm_block}.{split[0]}.{split[1]}"


class _UNetLayout:
    """The facts of a diffusers UNet config that decide LDM block numbers."""

    def __init__(self, unet_config: dict):
        layers = unet_config.get("layers_per_block")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(
                f"UNet config layers_per_block must be one positive int (got {layers!r}); "
                "per-block layer counts have no LDM single-file layout."
            )
        down = unet_config.get("down_block_types")
        up = unet_config.get("up_block_types")
        if not down or not up or len(down) != len(up):
            raise ValueError("UNet config needs down_block_types and up_block_types of the same length.")
        self.layers = layers
        self.down_count = len(down)
        self.up_has_attention = ["CrossAttn" in name for name in up]

    def check_block(self, direction: str, block: int, layer: int | None, key: str) -> None:
        count = self.down_count
        if block >= count:
            raise ValueError(f"UNet key {key!r} names {direction} block {block}, but the config has {count}.")
        max_layers = self.layers if direction == "down" else self.layers + 1
        if layer is not None and layer >= max_layers:
            raise ValueError(
                f"UNet key {key!r} names layer {layer}, but the config allows {max_layers} per {direction} block."
            )


def _unet_key(key: str, layout: _UNetLayout) -> str:
    top = _rename_top_level(key, UNET_TOP_LEVEL)
    if top is not None:
        return top
    per_block = layout.layers + 1

    match = _BLOCK_LAYER.fullmatch(key)
    if match:
        direction, block, kind, layer, suffix = match.groups()
        block, layer = int(block), int(layer)
        layout.check_block(direction, block, layer, key)
        if direction == "down":
            ldm_block = f"input_blocks.{1 + block * per_block + layer}"
        else:
            ldm_block = f"output_blocks.{block * per_block + layer}"
        if kind == "resnets":
            return _resnet_key(f"{ldm_block}.0", suffix, key)
        return f"{ldm_block}.1.{suffix}"

    match = _SAMPLER.fullmatch(key)
    if match:
        direction, block, _, param = match.groups()
        block = int(block)
        layout.check_block(direction, block, None, key)
        if direction == "down":
            return f"input_blocks.{1 + block * per_block + layout.layers}.0.op.{param}"
        slot = 2 if layout.up_has_attention[block] else 1
        return f"output_blocks.{block * per_block + layout.layers}.{slot}.conv.{param}"

    match = _MID_LAYER.fullmatch(key)
    if match:
        kind, index, suffix = match.groups()
        # resnet, attention, resnet -> 0, 1, 2
        if kind == "resnets":
            return _resnet_key(f"middle_block.{2 * int(index)}", suffix, key)
        return f"middle_block.{2 * int(index) + 1}.{suffix}"

    raise ValueError(f"Unexpected UNet key {key!r}: not part of a diffusers UNet2DConditionModel layout.")


def unet_to_ldm(state_dict: dict, unet_config: dict) -> dict:
    """Diffusers UNet2DConditionModel state dict -> LDM `diffusion_model` keys (no prefix).

    Tensors keep their stored shapes: SD1's conv `proj_in/out` and SD2/SDXL's linear ones are
    both what the LDM files hold.
    """
    layout = _UNetLayout(dict(unet_config))
    converted = {}
    for key, tensor in state_dict.items():
        ldm_key = _unet_key(key, layout)
        if ldm_key in converted:
            raise ValueError(f"UNet keys collide at {ldm_key!r}; is the state dict from one UNet?")
        converted[ldm_key] = tensor.contiguous()
    return converted


def _vae_attention_tensor(part: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
    # LDM's VAE attention is built from 1x1 convs; diffusers uses linear layers.
    if part != "norm" and param == "weight" and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def _vae_key(key: str, up_block_count: int) -> tuple[str, bool]:
    """(LDM key, whether it is a mid-block attention tensor)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, False

    coder, _, rest = key.partition(".")
    if coder in ("encoder", "decoder"):
        top = _rename_top_level(rest, VAE_TOP_LEVEL)
        if top is not None:
            return f"{coder}.{top}", False

    match = _VAE_BLOCK.fullmatch(key)
    if match:
        coder, direction, block, layer, suffix = match.groups()
        split = _split_part(suffix, VAE_RESNET_PARTS)
        if split is not None:
            ldm_block = _vae_block_name(direction, int(block), up_block_count)
            return f"{coder}.{ldm_block}.block.{layer}.{split[0]}.{split[1]}", False

    match = _VAE_SAMPLER.fullmatch(key)
    if match:
        coder, direction, block, _, param = match.groups()
        ldm_block = _vae_block_name(direction, int(block), up_block_count)
        sampler = "downsample" if direction == "down" else "upsample"
        return f"{coder}.{ldm_block}.{sampler}.conv.{param}", False

    match = _VAE_MID.fullmatch(key)
    if match:
        coder, kind, index, suffix = match.groups()
        if kind == "resnets":
            split = _split_part(suffix, VAE_RESNET_PARTS)
            if split is not None:
                return f"{coder}.mid.block_{int(index) + 1}.{split[0]}.{split[1]}", False
        elif index == "0":
            split = _split_part(suffix, VAE_ATTENTION_PARTS)
            if split is not None:
                return f"{coder}.mid.attn_1.{split[0]}.{split[1]}", True

    raise ValueError(f"Unexpected VAE key {key!r}: not part of a diffusers AutoencoderKL layout.")


def _vae_block_name(direction: str, block: int, up_block_count: int) -> str:
    # LDM numbers decoder up blocks from the lowest resolution; diffusers from the highest.
    if direction == "down":
        return f"down.{block}"
    return f"up.{up_block_count - 1 - block}"


def vae_to_ldm(state_dict: dict) -> dict:
    """Diffusers AutoencoderKL state dict -> LDM VAE keys (`encoder.*`, `decoder.*`,
    `quant_conv.*`, `post_quant_conv.*`, no prefix); attention weights become [C, C, 1, 1]."""
    up_indices = [int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    up_block_count = max(up_indices) + 1 if up_indices else 0
    converted = {}
    for key, tensor in state_dict.items():
        ldm_key, is_attention = _vae_key(key, up_block_count)
        if is_attention:
            part, param = ldm_key.rsplit(".", 2)[-2:]
            tensor = _vae_attention_tensor(part, param, tensor)
        converted[ldm_key] = tensor.contiguous()
    return converted


def clip_text_to_ldm(state_dict: dict) -> dict:
    """transformers CLIPTextModel state dict -> the keys under `cond_stage_model.transformer.`
    (`text_model.*`, no prefix). Accepts both the flattened (transformers >= 5.6) and the
    `text_model.`-wrapped layouts; drops the `position_ids` buffer some exports include."""
    converted = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_model."):
            ldm_key = key
        elif key.startswith(CLIP_TEXT_MODEL_ROOTS):
            ldm_key = "text_model." + key
        elif key == "text_projection.weight":
            ldm_key = key
        else:
            raise ValueError(f"Unexpected CLIP text key {key!r}: not part of a transformers CLIPTextModel.")
        converted[ldm_key] = tensor.contiguous()
    return converted


def pipeline_to_ldm(unet, vae, text_encoder) -> dict:
    """One single-file LDM state dict from a diffusers UNet, AutoencoderKL and CLIPTextModel."""
    converted = {}
    for key, tensor in unet_to_ldm(unet.state_dict(), unet.config).items():
        converted[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(vae.state_dict()).items():
        converted[VAE_PREFIX + key] = tensor
    for key, tensor in clip_text_to_ldm(text_encoder.state_dict()).items():
        converted[CLIP_PREFIX + key] = tensor
    return converted


def save_ldm_checkpoint(path, state_dict: dict, metadata: dict | None = None) -> Path:
    """Write a converted state dict as one .safetensors file; metadata values must be strings."""
    from safetensors.torch import save_file

    metadata = dict(metadata or {})
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; convert {bad} to strings first.")
    path = Path(path)
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, str(path), metadata=metadata)
    _sort_header_metadata(path)
    return path


def _sort_header_metadata(path: Path) -> None:
    """safetensors writes metadata in hash-map order, so the same model gives different bytes (and
    A1111 hashes) on every save; rewrite the header in place with the metadata keys sorted."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        metadata = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        ordered.update(header)
        encoded = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(encoded) > size:  # not expected: same content; leave the valid file as written
            return
        handle.seek(8)
        handle.write(encoded.ljust(size, b" "))  # safetensors pads its header with spaces too
