"""What the merger reads: a model seen under single-file (LDM / A1111) keys, one tensor at a time.

- `.safetensors` single files: memory-mapped (safe_open), shapes from the header;
- `.ckpt` / `.pt`: torch's weights-only unpickler (memory-mapped when the file is a zip);
- diffusers folders of the SD1 family (SD1, SD1 inpainting, tiny-world): their unet / vae /
  text_encoder safetensors renamed to LDM keys with `pipelines.ldm_convert` (VAE attention
  weights reshaped to 1x1 convs when read). SD2 / SDXL folders need the OpenCLIP text-encoder
  layout, which ldm_convert does not write: they are refused with a message.
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
from pipelines.probe import SafetensorsHeader, TensorInfo

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_FOLDER_ARCHS = (Arch.SD1, Arch.SD1_INPAINT, Arch.TINYWORLD)
_TINYWORLD_SPEC = "easel/tiny-world-v1"


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
                         "folders only: use single-file .safetensors for SD2/SDXL")
    files = {"unet": path / "unet" / "diffusion_pytorch_model.safetensors",
             "vae": path / "vae" / "diffusion_pytorch_model.safetensors",
             "text_encoder": path / "text_encoder" / "model.safetensors"}
    missing = [str(p.relative_to(path)) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"{role} ({path.name}) lacks {', '.join(missing)} (sharded or .bin weights are not read)")
    handles = {part: safe_open(str(file), framework="pt", device="cpu") for part, file in files.items()}
    metas = {part: {k: torch.empty(probe.read_safetensors_header(file).tensors[k].shape, device="meta")
                    for k in handles[part].keys()} for part, file in files.items()}
    dtypes = {part: probe.read_safetensors_header(file).tensors for part, file in files.items()}
    sources: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # ldm key -> (part, diffusers key, shape)

    unet_config = json.loads((path / "unet" / "config.json").read_text())
    for (ldm, tensor), key in zip(unet_to_ldm(metas["unet"], unet_config).items(), metas["unet"]):
        sources[UNET_PREFIX + ldm] = ("unet", key, tuple(tensor.shape))
    vae = vae_to_ldm(metas["vae"])
    if len(vae) != len(metas["vae"]):
        raise ValueError(f"{role} ({path.name}): unexpected VAE keys")
    for (ldm, tensor), key in zip(vae.items(), metas["vae"]):
        sources[VAE_PREFIX + ldm] = ("vae", key, tuple(tensor.shape))
    for key, tensor in metas["text_encoder"].items():
        for ldm in clip_text_to_ldm({key: tensor}):  # position_ids is dropped
            sources[CLIP_PREFIX + ldm] = ("text_encoder", key, tuple(tensor.shape))

    header = SafetensorsHeader(
        tensors={ldm: TensorInfo(dtypes[part][key].dtype, shape) for ldm, (part, key, shape) in sources.items()},
        metadata={"modelspec.architecture": _TINYWORLD_SPEC} if arch is Arch.TINYWORLD else {})

    def read(ldm_key: str) -> torch.Tensor:
        part, key, shape = sources[ldm_key]
        return handles[part].get_tensor(key).reshape(shape)

    return ModelTensors(path, header, read)
