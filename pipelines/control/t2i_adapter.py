"""T2I-Adapter units: loading (diffusers folders, single files in the diffusers or the original
TencentARC key layout) and running them through the ControlNet pipelines.

diffusers' SD1 T2I-Adapter pipeline has no `callback_on_step_end` (no progress, previews,
interrupt or prompt editing) and no img2img/inpaint variant, so adapters ride in the ControlNet
pipelines instead: `UnitControlNets` returns an adapter unit's features as the down residuals
with no mid residual, which the UNet adds inside its down blocks, the T2I-Adapter way
(`UNet2DConditionModel.forward`'s intrablock path). Weight and the guidance range go through the
pipeline's per-net scale as for ControlNets. ControlNet and T2I-Adapter units cannot be mixed in
one request (the UNet takes one kind of down residuals per call).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from pipelines.loading import ModelLoadError
from pipelines.registry import ModelEntry


def is_t2i_keys(keys) -> bool:
    return any(k.startswith(("adapter.", "body.0.")) for k in keys)


def original_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """TencentARC `conv_in.*`, `body.K.{in_conv,block1,block2}.*` (a flat list of blocks,
    `levels` x blocks per level) -> diffusers `adapter.*`."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    per_level = max(1, len(blocks) // levels)
    out = {}
    for key, tensor in state.items():
        if key.startswith("conv_in."):
            out["adapter." + key] = tensor
            continue
        match = re.match(r"body\.(\d+)\.(in_conv|block1|block2)\.(weight|bias)$", key)
        if not match:
            raise ModelLoadError(f"T2I-Adapter weight '{key}' is of a variant this version does not read")
        k, part, param = int(match.group(1)), match.group(2), match.group(3)
        level, block = divmod(k, per_level)
        out[f"adapter.body.{level}.in_conv.{param}" if part == "in_conv"
            else f"adapter.body.{level}.resnets.{block}.{part}.{param}"] = tensor
    return out


def adapter_config(state: dict[str, torch.Tensor], sdxl: bool, vae_factor: int) -> dict[str, Any]:
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"adapter\.body\.(\d+)\.", k))})
    channels = [int(state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in levels]
    res_blocks = len({m.group(1) for k in state if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k))})
    downscale = 16 if sdxl else vae_factor
    in_channels = int(state["adapter.conv_in.weight"].shape[1]) // (downscale * downscale)
    return dict(in_channels=in_channels, channels=channels, num_res_blocks=res_blocks, downscale_factor=downscale,
                adapter_type="full_adapter_xl" if sdxl else "full_adapter")


def load_t2i_adapter(entry: ModelEntry, unet_config, sdxl: bool, vae_factor: int, dtype: torch.dtype):
    from diffusers import T2IAdapter

    from pipelines.control.models import read_state_dict

    try:
        if entry.format == "diffusers":
            adapter = T2IAdapter.from_pretrained(entry.path, local_files_only=True, torch_dtype=dtype)
        else:
            state = read_state_dict(entry.path)
            if not any(k.startswith("adapter.") for k in state):
                state = original_to_diffusers(state, len(unet_config.block_out_channels))
            adapter = T2IAdapter(**adapter_config(state, sdxl, vae_factor))
            adapter.load_state_dict(state, strict=True)
            adapter.to(dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        raise ModelLoadError(f"T2I-Adapter {entry.name} could not be loaded: {text}") from exc
    channels = list(adapter.config.channels)
    if channels[0] != unet_config.block_out_channels[0] or len(channels) != len(unet_config.block_out_channels):
        raise ValueError(f"T2I-Adapter {entry.name} (channels {channels}) does not fit this checkpoint's UNet "
                         f"({list(unet_config.block_out_channels)}): pick one made for its base model")
    # The ControlNet pipelines read this from every net's config.
    adapter.register_to_config(global_pool_conditions=False)
    return adapter.requires_grad_(False).eval()


def vae_factor_of(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def adapter_features(adapter, image: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """The adapter's per-level features for a pipeline control image (0..1, RGB)."""
    if adapter.config.in_channels == 1:
        image = image.mean(dim=1, keepdim=True)
    return [f * scale for f in adapter(image.to(adapter.dtype))]

