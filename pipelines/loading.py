"""One loader per kind of model file, all offline: single files load with a bundled config
folder (`config=`) and our own tokenizer, so diffusers never looks anything up on the Hub."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import configs
from pipelines.arch import Arch
from pipelines.registry import ModelEntry

_NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message says which file and what to do."""


@dataclass
class LoadedCheckpoint:
    entry: ModelEntry
    arch: Arch
    components: dict[str, Any]  # unet, vae, text_encoder, tokenizer (+ _2 for SDXL), scheduler

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.components.items() if isinstance(v, torch.nn.Module)}


def pipeline_class(arch: Arch, task: str):
    """The diffusers pipeline class for an architecture and a task."""
    import diffusers as d

    table = {
        (False, "txt2img"): d.StableDiffusionPipeline,
        (False, "img2img"): d.StableDiffusionImg2ImgPipeline,
        (False, "inpaint"): d.StableDiffusionInpaintPipeline,
        (True, "txt2img"): d.StableDiffusionXLPipeline,
        (True, "img2img"): d.StableDiffusionXLImg2ImgPipeline,
        (True, "inpaint"): d.StableDiffusionXLInpaintPipeline,
    }
    return table[(arch.is_sdxl, task)]


def refuse_unsafe_pickle(path: Path) -> None:
    """`.ckpt`/`.pt` files load only if torch's weights-only unpickler accepts them."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path.name} needs full unpickling, which can run arbitrary code; refused. "
            "Convert it to .safetensors or get a safetensors release of the model.") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable PyTorch checkpoint ({exc.__class__.__name__}).") from exc


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _tokenizers(arch: Arch) -> dict[str, Any]:
    if arch is Arch.SDXL:
        return {"tokenizer": configs.load_tokenizer(), "tokenizer_2": configs.load_tokenizer(pad_with_bang=True)}
    if arch is Arch.SDXL_REFINER:
        return {"tokenizer_2": configs.load_tokenizer(pad_with_bang=True)}
    # SD2's OpenCLIP text encoder was trained with "!" (id 0) padding, as A1111 pads it.
    return {"tokenizer": configs.load_tokenizer(pad_with_bang=arch in (Arch.SD2, Arch.SD2_V))}


def load_checkpoint(entry: ModelEntry, dtype: torch.dtype) -> LoadedCheckpoint:
    """Load a checkpoint's components on the CPU. Raises ModelLoadError with a user message."""
    arch = entry.arch
    if arch is Arch.UNKNOWN and entry.format == "ckpt":
        refuse_unsafe_pickle(entry.path)
        arch = _probe_loaded_ckpt(entry.path)
    if arch is Arch.UNKNOWN:
        raise ModelLoadError(
            f"{entry.name}: architecture not recognised (not SD1, SD2, SDXL or tiny-world); "
            "is it a checkpoint, not a LoRA/VAE/ControlNet?")
    if arch is Arch.SDXL_REFINER:
        raise ModelLoadError(f"{entry.name} is an SDXL refiner; pick it as the refiner, not as the main model.")
    cls = pipeline_class(arch, "txt2img")
    try:
        if entry.format == "diffusers":
            pipe = cls.from_pretrained(entry.path, local_files_only=True, torch_dtype=dtype,
                                       **_missing_tokenizers(entry.path, arch), **_no_safety(arch))
        else:
            pipe = cls.from_single_file(str(entry.path), config=str(configs.config_dir(arch)),
                                        local_files_only=True, torch_dtype=dtype,
                                        **_tokenizers(arch), **_no_safety(arch))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{entry.name} could not be loaded as {arch.value}: {_short(exc)}") from exc
    components = {k: v for k, v in pipe.components.items() if v is not None}
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return LoadedCheckpoint(entry=entry, arch=arch, components=components)


def load_vae(entry: ModelEntry, arch: Arch, dtype: torch.dtype):
    """A standalone VAE, configured for the checkpoint architecture it will join."""
    from diffusers import AutoencoderKL

    if entry.format == "ckpt":
        refuse_unsafe_pickle(entry.path)
    try:
        if entry.format == "diffusers":
            vae = AutoencoderKL.from_pretrained(entry.path, local_files_only=True, torch_dtype=dtype)
        else:
            vae = AutoencoderKL.from_single_file(str(entry.path), config=str(configs.config_dir(arch)),
                                                 subfolder="vae", local_files_only=True, torch_dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"VAE {entry.name} does not fit a {arch.value} checkpoint or is damaged: {_short(exc)}") from exc
    return vae.requires_grad_(False).eval()


def _no_safety(arch: Arch) -> dict[str, Any]:
    return {} if arch.is_sdxl else dict(_NO_SAFETY)


def _missing_tokenizers(folder: Path, arch: Arch) -> dict[str, Any]:
    return {k: v for k, v in _tokenizers(arch).items() if not (folder / k).is_dir()}


def _probe_loaded_ckpt(path: Path) -> Arch:
    from pipelines import probe

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    header = probe.SafetensorsHeader(
        tensors={k: probe.TensorInfo(dtype=str(v.dtype), shape=list(v.shape))
                 for k, v in state.items() if isinstance(v, torch.Tensor)},
        metadata={})
    return probe.probe_checkpoint(header)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:300]
