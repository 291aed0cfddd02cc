"""What the merger reads: a model seen under single-file (LDM / A1111) keys, one tensor at a time.

- `.safetensors` single files: memory-mapped (safe_open), shapes from the header;
- `.ckpt` / `.pt`: torch's weights-only unpickler (memory-mapped when the file is a zip);
- diffusers folders of the SD1 family (SD1, SD1 inpainting, tiny-world) and SDXL (base and
  refiner): their unet / vae / text encoder safetensors renamed to LDM keys with
  `pipelines.ldm_convert` (VAE attention weights reshaped to 1x1 convs when read); SDXL's OpenCLIP
  text encoder as open_clip stores it (q/k/v joined into `attn.in_proj_*`, the projection
  transposed), joined when read. SD2 folders (OpenCLIP-H under `cond_stage_model.model.`) are
  refused with a message.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import torch

from pipelines import probe
from pipelines.arch import Arch
from pipelines.ldm_convert import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, clip_text_to_ldm, unet_to_ldm, vae_to_ldm
from pipelines.probe import REFINER_BIGG_PREFIX, SDXL_BIGG_PREFIX, SafetensorsHeader, TensorInfo

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_FOLDER_ARCHS = (Arch.SD1, Arch.SD1_INPAINT, Arch.TINYWORLD, Arch.SDXL, Arch.SDXL_REFINER)
_TINYWORLD_SPEC = "easel/tiny-world-v1"
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
# per architecture: the text encoders of a diffusers folder -> (LDM prefix, layout)
_TEXT_ENCODERS = {
    Arch.SDXL: {"text_encoder": (SDXL_CLIP_L_PREFIX, "clip"), "text_encoder_2": (SDXL_BIGG_PREFIX, "openclip")},
    Arch.SDXL_REFINER: {"text_encoder_2": (REFINER_BIGG_PREFIX, "openclip")},
}
_SD1_TEXT_ENCODERS = {"text_encoder": (CLIP_PREFIX, "clip")}
# transformers CLIP layer parts -> open_clip's (q/k/v are joined separately)
_OPENCLIP_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


class ModelTensors:
    """A model under LDM keys: `header` (dtypes, shapes, metadata), `get(key)` one tensor."""

    def __init__(self, path: Path, header: SafetensorsHeader, read: Callable[[str], torch.Tensor]) -> None:
        self.path = Path(path)
        self.header = header
        self._read = read

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header.tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._read(key)

    def __contains__(self, key: str) -> bool:
        return key in self.header.tensors


def open_model(path: Path, role: str) -> ModelTensors:
    path = Path(path)
    if path.is_dir():
        return _diffusers_folder(path, role)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors(path, role)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _pickle(path, role)
    raise ValueError(f"{role} ({path.name}) is not a .safetensors, .ckpt or diffusers folder")


def _safetensors(path: Path, role: str) -> ModelTensors:
    from safetensors import safe_open

    try:
        header = probe.read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{role} ({path.name}) cannot be read as safetensors: {exc}") from exc
    handle = safe_open(str(path), framework="pt", device="cpu")
    return ModelTensors(path, header, handle.get_tensor)


def _pickle(path: Path, role: str) -> ModelTensors:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{role} ({path.name}) needs full unpickling, which can run arbitrary code; refused. "
                         "Use a .safetensors release") from exc
    except Exception as exc:
        raise ValueError(f"{role} ({path.name}) is not a readable PyTorch checkpoint") from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    header = SafetensorsHeader(tensors={k: TensorInfo(_DTYPE_NAMES.get(v.dtype, "F32"), tuple(v.shape))
                                        for k, v in tensors.items()}, metadata={})
    return ModelTensors(path, header, tensors.__getitem__)


def _diffusers_folder(path: Path, role: str) -> ModelTensors:
    from safetensors import safe_open

    arch = probe.probe_diffusers_folder(path)
    if arch not in _FOLDER_ARCHS:
        raise ValueError(f"{role} ({path.name}) is a {arch.value} diffusers folder; the merger converts SD1-family "
                         "and SDXL folders only: use a single-file .safetensors for SD2")
    encoders = _TEXT_ENCODERS.get(arch, _SD1_TEXT_ENCODERS)
    files = {"unet": path / "unet" / "diffusion_pytorch_model.safetensors",
             "vae": path / "vae" / "diffusion_pytorch_model.safetensors",
             **{part: path / part / "model.safetensors" for part in encoders}}
    missing = [str(p.relative_to(path)) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"{role} ({path.name}) lacks {', '.join(missing)} (sharded or .bin weights are not read)")
    handles = {part: safe_open(str(file), framework="pt", device="cpu") for part, file in files.items()}
    headers = {part: probe.read_safetensors_header(file).tensors for part, file in files.items()}
    metas = {part: {k: torch.empty(headers[part][k].shape, device="meta") for k in handles[part].keys()}
             for part in files}
    # ldm key -> (part, diffusers keys, how they become the LDM tensor, shape)
    sources: dict[str, tuple[str, tuple[str, ...], str, tuple[int, ...]]] = {}

    unet_config = json.loads((path / "unet" / "config.json").read_text())
    for (ldm, tensor), key in zip(unet_to_ldm(metas["unet"], unet_config).items(), metas["unet"]):
        sources[UNET_PREFIX + ldm] = ("unet", (key,), "same", tuple(tensor.shape))
    vae = vae_to_ldm(metas["vae"])
    if len(vae) != len(metas["vae"]):
        raise ValueError(f"{role} ({path.name}): unexpected VAE keys")
    for (ldm, tensor), key in zip(vae.items(), metas["vae"]):
        sources[VAE_PREFIX + ldm] = ("vae", (key,), "same", tuple(tensor.shape))
    for part, (prefix, layout) in encoders.items():
        if layout == "clip":
            for key, tensor in metas[part].items():
                for ldm in clip_text_to_ldm({key: tensor}):  # position_ids is dropped
                    sources[prefix + ldm] = (part, (key,), "same", tuple(tensor.shape))
        else:
            for ldm, (keys, how) in openclip_sources(list(metas[part]), role).items():
                shapes = [tuple(metas[part][k].shape) for k in keys]
                shape = ((sum(s[0] for s in shapes), *shapes[0][1:]) if how == "cat"
                         else shapes[0][::-1] if how == "transpose" else shapes[0])
                sources[prefix + ldm] = (part, keys, how, shape)

    header = SafetensorsHeader(
        tensors={ldm: TensorInfo(headers[part][keys[0]].dtype, shape)
                 for ldm, (part, keys, _how, shape) in sources.items()},
        metadata={"modelspec.architecture": _TINYWORLD_SPEC} if arch is Arch.TINYWORLD else {})

    def read(ldm_key: str) -> torch.Tensor:
        part, keys, how, shape = sources[ldm_key]
        tensors = [handles[part].get_tensor(key) for key in keys]
        if how == "cat":
            return torch.cat(tensors)
        if how == "transpose":
            return tensors[0].T.contiguous()
        return tensors[0].reshape(shape)

    return ModelTensors(path, header, read)


def openclip_sources(keys: list[str], role: str = "text encoder") -> dict[str, tuple[tuple[str, ...], str]]:
    """open_clip key (no prefix) -> (the transformers CLIPTextModelWithProjection keys it is made
    of, "same" | "cat" (q, k, v joined along rows) | "transpose" (text_projection))."""
    flat = {key.removeprefix("text_model."): key for key in keys if not key.endswith("position_ids")}
    layers = sorted({int(key.split(".")[2]) for key in flat if key.startswith("encoder.layers.")})
    out: dict[str, tuple[tuple[str, ...], str]] = {}
    used: set[str] = set()

    def take(*names: str) -> tuple[str, ...]:
        missing = [n for n in names if n not in flat]
        if missing:
            raise ValueError(f"{role}: {missing[0]} is missing; not a CLIPTextModelWithProjection")
        used.update(names)
        return tuple(flat[n] for n in names)

    for i in layers:
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{target}attn.in_proj_{param}"] = (
                take(*(f"{source}self_attn.{q}_proj.{param}" for q in "qkv")), "cat")
            for part, ldm_part in _OPENCLIP_PARTS.items():
                out[f"{target}{ldm_part}.{param}"] = (take(f"{source}{part}.{param}"), "same")
    for key, ldm in _OPENCLIP_TOP.items():
        out[ldm] = (take(key), "same")
    out["text_projection"] = (take("text_projection.weight"), "transpose")
    left = sorted(set(flat) - used)
    if left:
        raise ValueError(f"{role}: unexpected text encoder keys ({left[0]}, ...)")
    return out
