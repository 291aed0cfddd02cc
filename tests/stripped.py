"""Header-only safetensors files for probing tests.

`write_stripped` writes a valid safetensors header with the real shapes and data offsets, then
extends the file to its declared size with `truncate`, which makes a sparse file: a multi-MB
"checkpoint" costs a few KB of disk and no tensor data. The layouts below hold a handful of the
keys each architecture's detection looks at, with the shapes real files have.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Mapping

DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "U8": 1}

Shape = tuple[int, ...]


def write_stripped(path: Path, tensors: Mapping[str, Shape | tuple[str, Shape]],
                   metadata: Mapping[str, str] | None = None, data: bytes | None = None) -> Path:
    """A safetensors file describing `tensors` (name -> shape, F16, or name -> (dtype, shape)).

    The data section is zeros (sparse) unless `data` gives its exact bytes.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, spec in tensors.items():
        dtype, shape = spec if isinstance(spec[0] if spec else None, str) else ("F16", spec)
        nbytes = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    if data is not None and len(data) != offset:
        raise ValueError(f"data has {len(data)} bytes, the header declares {offset}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if data is not None:
            f.write(data)
        else:
            f.truncate(8 + len(raw) + offset)
    return path


UNET = "model.diffusion_model."


def _ldm_vae(prefix: str) -> dict[str, Shape]:
    return {
        f"{prefix}encoder.conv_in.weight": (128, 3, 3, 3),
        f"{prefix}encoder.conv_out.weight": (8, 512, 3, 3),
        f"{prefix}decoder.conv_in.weight": (512, 4, 3, 3),
        f"{prefix}decoder.conv_out.weight": (3, 128, 3, 3),
        f"{prefix}quant_conv.weight": (8, 8, 1, 1),
        f"{prefix}post_quant_conv.weight": (4, 4, 1, 1),
    }


def sd1_layout(inpaint: bool = False) -> dict[str, Shape]:
    return {
        UNET + "input_blocks.0.0.weight": (320, 9 if inpaint else 4, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        UNET + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        UNET + "out.2.weight": (4, 320, 3, 3),
        **_ldm_vae("first_stage_model."),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }


def sd2_layout() -> dict[str, Shape]:
    return {
        UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        UNET + "input_blocks.1.1.proj_in.weight": (320, 320),
        UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        UNET + "out.2.weight": (4, 320, 3, 3),
        **_ldm_vae("first_stage_model."),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    }


def sdxl_layout() -> dict[str, Shape]:
    return {
        UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        UNET + "label_emb.0.0.weight": (1280, 2816),
        **_ldm_vae("first_stage_model."),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
    }


def sdxl_refiner_layout() -> dict[str, Shape]:
    return {
        UNET + "input_blocks.0.0.weight": (384, 4, 3, 3),
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
        UNET + "label_emb.0.0.weight": (1536, 2560),
        **_ldm_vae("first_stage_model."),
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.0.model.ln_final.weight": (1280,),
    }


TINYWORLD_METADATA = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "easel/tiny-world-v1",
                      "modelspec.title": "tiny-world", "modelspec.resolution": "64x64"}


def tinyworld_layout() -> dict[str, Shape]:
    # SD1 key names with tiny widths (64-wide text encoder and cross-attention).
    return {
        UNET + "input_blocks.0.0.weight": (64, 4, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (64, 64),
        UNET + "out.2.weight": (4, 64, 3, 3),
        **_ldm_vae("first_stage_model."),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (64,),
    }


def vae_layout() -> dict[str, Shape]:
    return _ldm_vae("")


def _kohya_pair(name: str, rank: int, in_dim: int, out_dim: int) -> dict[str, Shape]:
    return {f"{name}.lora_down.weight": (rank, in_dim), f"{name}.lora_up.weight": (out_dim, rank),
            f"{name}.alpha": ()}


def kohya_lora_sd1_layout(rank: int = 4) -> dict[str, Shape]:
    return {
        **_kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", rank, 768, 768),
        **_kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", rank, 768, 320),
    }


def kohya_lora_sdxl_layout(rank: int = 4) -> dict[str, Shape]:
    return {
        **_kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", rank, 768, 768),
        **_kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", rank, 1280, 1280),
        **_kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", rank, 2048, 640),
    }


KOHYA_SD1_METADATA = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_module": "networks.lora",
                      "ss_output_name": "styleA", "ss_network_dim": "4"}
KOHYA_SDXL_METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                       "ss_network_module": "networks.lora", "ss_output_name": "xlstyle"}
