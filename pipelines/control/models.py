"""Loading ControlNet models, offline: diffusers folders, and single files in the lllyasviel /
A1111 layout (`control_model.*` or bare LDM keys) or the diffusers key layout, each read with
the bundled config of its base family (pipelines/configs/controlnet/<family>/config.json).

The base family comes from the cross-attention width of the file's weights, so an SDXL
ControlNet is refused with an SD1 checkpoint before anything runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from pipelines.arch import Arch
from pipelines.loading import ModelLoadError, refuse_unsafe_pickle
from pipelines.registry import ModelEntry

# Cross-attention width -> base family. A ControlNet fits every checkpoint of its family.
_FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl", 64: "tinyworld"}
_FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "tinyworld": "tiny-world"}


def family_of_arch(arch: Arch) -> str | None:
    """The ControlNet family a checkpoint architecture takes, None when none exists."""
    return {Arch.SD1: "sd1", Arch.SD1_INPAINT: "sd1", Arch.SD2: "sd2", Arch.SD2_V: "sd2",
            Arch.SDXL: "sdxl", Arch.TINYWORLD: "tinyworld"}.get(Arch(arch))


def family_label(family: str | None) -> str:
    return _FAMILY_LABELS.get(family or "", "an unknown base model")


def family_of_entry(entry: ModelEntry) -> str | None:
    """From the registry's probe (SD1/SD2/SDXL) or the header's cross-attention widths (tiny
    models, IP-Adapters); None when it cannot be told without loading the file."""
    family = family_of_arch(entry.arch)
    if family is not None or entry.format != "safetensors":
        return family
    from pipelines.control import ip_adapter

    shapes = _header_shapes(entry.path)
    return family_of_state_shapes(shapes) or ip_adapter.family_of_shapes(shapes)


def model_kind(entry: ModelEntry) -> str:
    """"controlnet" | "ip_adapter" | "t2i_adapter" | "image_encoder", from names only."""
    if entry.format == "diffusers":
        import json

        try:
            config = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "controlnet"
        name = str(config.get("_class_name", "")) + " ".join(config.get("architectures") or [])
        return "t2i_adapter" if "Adapter" in name else "image_encoder" if "CLIPVision" in name else "controlnet"
    if entry.format != "safetensors":
        return "controlnet"
    from pipelines.control import ip_adapter

    keys = list(_header_shapes(entry.path))
    if ip_adapter.is_ip_adapter_keys(keys):
        return "ip_adapter"
    if any(k.startswith(("adapter.", "body.0.")) for k in keys):
        return "t2i_adapter"
    return "controlnet"


def _header_shapes(path: Path) -> dict[str, Any]:
    from pipelines import probe

    return {k: v.shape for k, v in probe.read_safetensors_header(path).tensors.items()}


def family_of_state_shapes(shapes: Mapping[str, Any]) -> str | None:
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return _FAMILY_BY_CONTEXT_DIM.get(int(shape[-1]))
    return None


def config_dir(family: str) -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "controlnet" / family


def check_compatible(entry: ModelEntry, family: str | None, checkpoint_arch: Arch, checkpoint_name: str) -> None:
    """Refuse a ControlNet made for another base model, with what to pick instead."""
    wanted = family_of_arch(checkpoint_arch)
    if wanted is None:
        raise ValueError(f"ControlNet does not work with {checkpoint_name} ({Arch(checkpoint_arch).value}); "
                         "pick an SD1.x, SD2.x or SDXL checkpoint")
    if family is not None and family != wanted:
        raise ValueError(f"ControlNet {entry.name} is for {family_label(family)}, but the checkpoint "
                         f"{checkpoint_name} is {family_label(wanted)}: pick a {family_label(wanted)} ControlNet")


def load_controlnet(entry: ModelEntry, dtype: torch.dtype):
    """A ControlNetModel on the CPU, in eval mode. Raises ModelLoadError with a user message."""
    from diffusers import ControlNetModel

    try:
        if entry.format == "diffusers":
            model = ControlNetModel.from_pretrained(entry.path, local_files_only=True, torch_dtype=dtype)
        else:
            state = read_state_dict(entry.path)
            family = family_of_state_shapes({k: tuple(v.shape) for k, v in state.items()})
            if family is None:
                raise ModelLoadError(f"{entry.name} is not a ControlNet this version can read (no cross-attention "
                                     "weights found); T2I-Adapters and IP-Adapters are other kinds")
            config = ControlNetModel.load_config(config_dir(family))
            model = ControlNetModel.from_single_file(diffusers_state(state, config), config=str(config_dir(family)),
                                                     local_files_only=True, torch_dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        raise ModelLoadError(f"ControlNet {entry.name} could not be loaded: {text}") from exc
    return model.requires_grad_(False).eval()


_LDM_PREFIX = "control_model."
# What diffusers' ControlNet converter leaves out: the SDXL size/time embedding of LDM-layout files.
_LABEL_EMB = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def diffusers_state(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """ControlNet weights in diffusers names: LDM-layout files (`control_model.*` or bare, as
    lllyasviel's) through diffusers' single-file converter, plus the SDXL `label_emb` it skips;
    diffusers-layout files as they are. Works on meta tensors too (no data is touched)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "time_embedding.linear_1.weight" in state:
        return dict(state)
    converted = convert_controlnet_checkpoint(dict(state), dict(config))
    bare = {k[len(_LDM_PREFIX):] if k.startswith(_LDM_PREFIX) else k: v for k, v in state.items()}
    for ldm, name in _LABEL_EMB.items():
        for param in ("weight", "bias"):
            if f"{ldm}.{param}" in bare:
                converted[f"{name}.{param}"] = bare[f"{ldm}.{param}"]
    return {k: v for k, v in converted.items() if v is not None}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    refuse_unsafe_pickle(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def loaded_family(model) -> str | None:
    return _FAMILY_BY_CONTEXT_DIM.get(int(model.config.cross_attention_dim))


def check_fits_unet(entry: ModelEntry, model, unet, checkpoint_name: str) -> None:
    """After loading: the ControlNet must read the UNet's text context and, for SDXL, its
    size/time embedding (what any .pth or folder could not tell before)."""
    mine, theirs = model.config, unet.config
    if int(mine.cross_attention_dim) != int(theirs.cross_attention_dim) or \
            mine.addition_embed_type != theirs.addition_embed_type:
        raise ValueError(f"ControlNet {entry.name} is for {family_label(loaded_family(model))}, but the checkpoint "
                         f"{checkpoint_name} does not match it: pick a ControlNet made for its base model")
