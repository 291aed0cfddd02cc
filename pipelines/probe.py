"""Tell what a model file is from its safetensors header alone (a few KB read, no tensor load).

Key layouts follow diffusers' single-file detection (a1111-compat §e): the UNet cross-attention
width (`attn2.to_k` last dim) separates SD1 (768), SD2 (1024), SDXL (2048) and the SDXL refiner
(1280); the conditioner keys separate SDXL base from refiner; the first conv's input channels
mark inpainting models. What the header cannot say (SD2 epsilon vs v-prediction) comes from
metadata or an LDM `<stem>.yaml` sidecar.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pipelines.arch import Arch

# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
TINYWORLD_ARCHITECTURE = "easel/tiny-world-v1"

UNET_PREFIX = "model.diffusion_model."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."
SD1_INPUT_CONV = UNET_PREFIX + "input_blocks.0.0.weight"

# Cross-attention width (text encoder hidden size the UNet attends to) -> base architecture.
_CONTEXT_DIMS = {768: Arch.SD1, 1024: Arch.SD2, 1280: Arch.SDXL_REFINER, 2048: Arch.SDXL}

# ModelSpec architecture strings, most specific first (an adapter adds "/lora" etc.).
_MODELSPEC_PREFIXES = (
    (TINYWORLD_ARCHITECTURE, Arch.TINYWORLD),
    ("stable-diffusion-xl-v1-refiner", Arch.SDXL_REFINER),
    ("stable-diffusion-xl-v1", Arch.SDXL),
    ("stable-diffusion-v2-768-v", Arch.SD2_V),
    ("stable-diffusion-v2", Arch.SD2),
    ("stable-diffusion-v1", Arch.SD1),
)

_V_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?v[\"']?\s*(#.*)?$", re.MULTILINE)


class SafetensorsHeaderError(ValueError):
    """The file is not a readable safetensors file (truncated, not safetensors, bad JSON)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)


# --- reading ----------------------------------------------------------------------------------

def read_safetensors_header(path: Path | str) -> SafetensorsHeader:
    """Parse the header (8-byte little-endian length, then JSON) and check it against the file
    size, so a truncated download is reported here rather than at load time."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(0, 2)
        file_size = f.tell()
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsHeaderError(f"{path.name}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length < 2 or length > MAX_HEADER_BYTES or 8 + length > file_size:
            raise SafetensorsHeaderError(
                f"{path.name}: not a safetensors file (header length {length} does not fit a "
                f"{file_size}-byte file); re-download it")
        raw = f.read(length)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsHeaderError(f"{path.name}: damaged safetensors header ({exc.__class__.__name__}); "
                                     "re-download it") from exc
    if not isinstance(doc, dict):
        raise SafetensorsHeaderError(f"{path.name}: damaged safetensors header (not a JSON object)")
    data_size = file_size - 8 - length
    metadata_raw = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise SafetensorsHeaderError(f"{path.name}: damaged safetensors header (__metadata__ is not an object)")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata_raw.items()}
    tensors = {}
    for name, info in doc.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            tensors[name] = TensorInfo(dtype=str(dtype), shape=tuple(shape))
        except (TypeError, KeyError, ValueError) as exc:
            raise SafetensorsHeaderError(f"{path.name}: damaged safetensors header (entry {name!r})") from exc
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsHeaderError(
                f"{path.name}: truncated (tensor {name!r} ends at byte {end} of a {data_size}-byte "
                "data section); re-download it")
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


def read_v_parameterization_sidecar(checkpoint: Path) -> bool:
    """True when an LDM config `<stem>.yaml` beside the checkpoint says `parameterization: "v"`."""
    sidecar = checkpoint.with_suffix(".yaml")
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(_V_PARAMETERIZATION.search(text))


def probe_checkpoint_file(path: Path) -> Arch:
    """Architecture of a single-file safetensors checkpoint, using a `.yaml` sidecar for SD2-v."""
    arch = probe_checkpoint(read_safetensors_header(path))
    if arch is Arch.SD2 and read_v_parameterization_sidecar(path):
        return Arch.SD2_V
    return arch


# --- checkpoints ------------------------------------------------------------------------------

def probe_checkpoint(header: SafetensorsHeader) -> Arch:
    """SD1 / SD1-inpaint / SD2 / SD2-v / SDXL / SDXL refiner / tiny-world, else UNKNOWN.

    A checkpoint needs the LDM UNet prefix; LoRAs, VAEs and ControlNets come out UNKNOWN.
    Inpainting variants other than SD1 (SD2/SDXL with 9 input channels) and other input widths
    (instruct-pix2pix) have no Arch of their own, so they are UNKNOWN too.
    """
    metadata = header.metadata
    if metadata.get("modelspec.architecture") == TINYWORLD_ARCHITECTURE:
        return Arch.TINYWORLD
    keys = header.tensors.keys()
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        return Arch.UNKNOWN

    if any(k.startswith(SDXL_BIGG_PREFIX) for k in keys):
        base = Arch.SDXL
    elif any(k.startswith(REFINER_BIGG_PREFIX) for k in keys):
        base = Arch.SDXL_REFINER
    else:
        base = _base_from_unet_and_text_encoder(header)
    if base is Arch.UNKNOWN:
        return base

    conv_in = header.tensors.get(SD1_INPUT_CONV)
    in_channels = conv_in.shape[1] if conv_in is not None and len(conv_in.shape) == 4 else 4
    if in_channels == 9 and base is Arch.SD1:
        return Arch.SD1_INPAINT
    if in_channels != 4:
        return Arch.UNKNOWN
    if base is Arch.SD2 and _says_v_prediction(metadata):
        return Arch.SD2_V
    return base


def _base_from_unet_and_text_encoder(header: SafetensorsHeader) -> Arch:
    keys = header.tensors.keys()
    clip_l = any(k.startswith("cond_stage_model.transformer.") for k in keys)
    context_dim = _unet_context_dim(header)
    if context_dim is None:  # no cross-attention width to read: the text encoder decides
        if clip_l:
            return Arch.SD1
        return Arch.SD2 if any(k.startswith("cond_stage_model.model.") for k in keys) else Arch.UNKNOWN
    if context_dim <= 256 and clip_l:
        # SD1 layout at toy widths: tiny-world without its metadata (e.g. a .ckpt export).
        return Arch.TINYWORLD
    return _CONTEXT_DIMS.get(context_dim, Arch.UNKNOWN)


def _unet_context_dim(header: SafetensorsHeader) -> int | None:
    # diffusers' SD1 marker key first; any cross-attention key otherwise (SDXL has none in block 2).
    marker = header.tensors.get(UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight")
    if marker is not None:
        return marker.shape[-1]
    for key, info in header.tensors.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and info.shape:
            return info.shape[-1]
    return None


def _says_v_prediction(metadata: Mapping[str, str]) -> bool:
    return (metadata.get("modelspec.prediction_type", "").lower() == "v"
            or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v2-768-v"))


# --- diffusers folders ------------------------------------------------------------------------

def _is_refiner_index(index: dict) -> bool:
    """An SDXL refiner pipeline folder: text_encoder_2 without text_encoder, or the refiner flag."""
    text_encoder = index.get("text_encoder")
    return bool(index.get("requires_aesthetics_score")) or (
        bool(index.get("text_encoder_2")) and (not text_encoder or text_encoder == [None, None]))


def probe_diffusers_folder(path: Path | str) -> Arch:
    """Architecture of a diffusers pipeline folder from model_index.json and unet/config.json.

    Raises ValueError when the folder has no readable model_index.json.
    """
    path = Path(path)
    index = _read_json(path / "model_index.json")  # the marker of a pipeline folder; must be readable
    try:
        unet = _read_json(path / "unet" / "config.json")
    except ValueError:
        return Arch.UNKNOWN
    cross_dim = unet.get("cross_attention_dim")
    if isinstance(cross_dim, list):  # per-block widths; all equal in SD-family models
        cross_dim = cross_dim[0] if cross_dim else None
    in_channels = unet.get("in_channels", 4)
    if cross_dim in _CONTEXT_DIMS:
        base = _CONTEXT_DIMS[cross_dim]
    elif isinstance(cross_dim, int) and cross_dim <= 256 and in_channels == 4:
        if unet.get("addition_embed_type") == "text_time":
            # a tiny SDXL layout (size-and-crop conditioning): test models; a refiner has no text_encoder
            return Arch.SDXL_REFINER if _is_refiner_index(index) else Arch.SDXL
        # A tiny SD1-layout model: the only such models Easel knows are tiny-world ones.
        return Arch.TINYWORLD
    else:
        return Arch.UNKNOWN
    if in_channels == 9 and base is Arch.SD1:
        return Arch.SD1_INPAINT
    if in_channels != 4:
        return Arch.UNKNOWN
    if base is Arch.SD2 and _scheduler_prediction(path) == "v_prediction":
        return Arch.SD2_V
    return base


def _scheduler_prediction(path: Path) -> str | None:
    try:
        return _read_json(path / "scheduler" / "scheduler_config.json").get("prediction_type")
    except ValueError:
        return None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: missing or not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return doc


# --- VAEs, LoRAs, embeddings, ControlNets -----------------------------------------------------

_VAE_PREFIXES = ("", "first_stage_model.", "vae.")


def probe_vae(header: SafetensorsHeader) -> bool:
    """True for a VAE: encoder + decoder weights, un-prefixed (standalone, LDM or diffusers
    names) or under `first_stage_model.` / `vae.`, and no UNet (a full checkpoint is not a VAE)."""
    keys = header.tensors.keys()
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return False
    for prefix in _VAE_PREFIXES:
        has_encoder = any(k.startswith(prefix + "encoder.") for k in keys)
        has_decoder = any(k.startswith(prefix + "decoder.") for k in keys)
        if has_encoder and has_decoder:
            return True
    return False


def probe_lora_base(header: SafetensorsHeader) -> Arch:
    """The base model a LoRA / LyCORIS file was trained for: kohya metadata, then ModelSpec,
    then tensor widths (text encoder hidden size or UNet cross-attention width)."""
    metadata = header.metadata
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return Arch.SDXL
    if version.startswith("sd_v2"):
        return Arch.SD2_V if version.endswith("_v") else Arch.SD2
    if version.startswith("sd_v1"):
        return Arch.SD1
    if metadata.get("ss_v2") == "True":
        return Arch.SD2_V if metadata.get("ss_v_parameterization") == "True" else Arch.SD2
    from_spec = _arch_from_modelspec(metadata.get("modelspec.architecture", ""))
    if from_spec is not Arch.UNKNOWN:
        return from_spec
    from_keys = _lora_arch_from_keys(header)
    if from_keys is Arch.UNKNOWN and metadata.get("ss_v2") == "False":
        return Arch.SD1  # an old kohya SD1 file whose keys we could not read widths from
    return from_keys


def _arch_from_modelspec(architecture: str) -> Arch:
    for prefix, arch in _MODELSPEC_PREFIXES:
        if architecture.startswith(prefix):
            return arch
    return Arch.UNKNOWN


_SDXL_TE2_PREFIXES = ("lora_te2_", "text_encoder_2.", "lora_te2.")
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".hada_w1_b", ".hada_w2_b")


def _lora_arch_from_keys(header: SafetensorsHeader) -> Arch:
    tensors = header.tensors
    if any(k.startswith(_SDXL_TE2_PREFIXES) for k in tensors):
        return Arch.SDXL
    for key, info in tensors.items():
        if not info.shape or not key.endswith(_DOWN_SUFFIXES):
            continue
        # The input width of a text-encoder q projection is the text encoder's hidden size;
        # that of a UNet attn2.to_k is the cross-attention width. Both map through the same table.
        is_te_q = key.startswith(("lora_te_", "text_encoder.")) and ("q_proj" in key)
        is_unet_to_k = ("attn2_to_k" in key) or ("attn2.to_k" in key)
        if is_te_q or is_unet_to_k:
            arch = _CONTEXT_DIMS.get(info.shape[-1], Arch.UNKNOWN)
            if arch is not Arch.UNKNOWN:
                return arch
    return Arch.UNKNOWN


def probe_embedding(header: SafetensorsHeader) -> Arch:
    """Textual inversion: SDXL files hold `clip_l` + `clip_g`; SD1/SD2 ones one vector table
    whose width is the text encoder's (768 / 1024)."""
    tensors = header.tensors
    if "clip_g" in tensors and "clip_l" in tensors:
        return Arch.SDXL
    from_spec = _arch_from_modelspec(header.metadata.get("modelspec.architecture", ""))
    if from_spec is not Arch.UNKNOWN:
        return from_spec
    if len(tensors) == 1 or "emb_params" in tensors:
        info = tensors.get("emb_params") or next(iter(tensors.values()))
        if info.shape:
            arch = _CONTEXT_DIMS.get(info.shape[-1], Arch.UNKNOWN)
            if arch in (Arch.SD1, Arch.SD2):
                return arch
    return Arch.UNKNOWN


def probe_controlnet(header: SafetensorsHeader) -> Arch:
    """ControlNet base from its cross-attention width (LDM `control_model.*` or diffusers
    names); T2I-Adapters and other attention-free models are UNKNOWN."""
    for key, info in header.tensors.items():
        if key.endswith("attn2.to_k.weight") and info.shape:
            arch = _CONTEXT_DIMS.get(info.shape[-1], Arch.UNKNOWN)
            return arch if arch in (Arch.SD1, Arch.SD2, Arch.SDXL) else Arch.UNKNOWN
    return Arch.UNKNOWN
