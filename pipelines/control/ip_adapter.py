"""IP-Adapter units: an image prompt through diffusers' `load_ip_adapter`.

Files: h94-style single files (`ip-adapter_sd15.safetensors`, keys `image_proj.*` +
`ip_adapter.*`) in models/ControlNet or models/ipadapter. The CLIP image encoder is a diffusers
/ transformers folder (config.json + weights) found at models/ipadapter/image_encoder,
models/ControlNet/image_encoder or models/clip_vision/<folder>; it is cached like every model.

`load_ip_adapter` changes the shared UNet (attention processors, `encoder_hid_proj`), so the
UNet's state is backed up first and restored exactly after the generation (patch with backup,
architecture-notes.md); the base pipeline is untouched because the adapter is loaded on a
per-request pipeline made with `from_pipe`.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from pipelines.loading import ModelLoadError
from pipelines.registry import ModelEntry

IPADAPTER_FOLDER = "ipadapter"
_FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl", 64: "tinyworld"}


def is_ip_adapter_keys(keys: Sequence[str]) -> bool:
    return any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)


def family_of_shapes(shapes: dict[str, Sequence[int]]) -> str | None:
    for key, shape in shapes.items():
        if key.endswith("to_k_ip.weight") and len(shape) == 2:
            return _FAMILY_BY_CONTEXT_DIM.get(int(shape[-1]))
    return None


def read_ip_adapter(entry: ModelEntry) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} as `load_ip_adapter` takes it."""
    if entry.path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"IP-Adapter {entry.name}: only .safetensors IP-Adapters are read; "
                             "get the safetensors release of the model")
    from safetensors import safe_open

    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(entry.path), framework="pt", device="cpu") as f:
        for key in f.keys():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = f.get_tensor(key)
    if not state["image_proj"] or not state["ip_adapter"]:
        raise ModelLoadError(f"{entry.name} is not an IP-Adapter (no image_proj.* / ip_adapter.* weights)")
    return state


def image_encoder_candidates(models_dir: Path, adapter_path: Path | None = None) -> list[Path]:
    """Where the encoder is looked for, first match wins: beside the adapter (so an adapter in
    models/ControlNet takes models/ControlNet/image_encoder), models/ipadapter/image_encoder,
    models/ControlNet/image_encoder, then every folder of models/clip_vision."""
    folders = [adapter_path.parent / "image_encoder"] if adapter_path is not None else []
    folders += [models_dir / IPADAPTER_FOLDER / "image_encoder", models_dir / "ControlNet" / "image_encoder"]
    clip_vision = models_dir / "clip_vision"
    if clip_vision.is_dir():
        folders += sorted(p for p in clip_vision.iterdir() if p.is_dir())
    return list(dict.fromkeys(folders))


def find_image_encoder(models_dir: Path, adapter_path: Path | None = None) -> Path:
    for folder in image_encoder_candidates(models_dir, adapter_path):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError("IP-Adapter needs its CLIP image encoder: put the diffusers image_encoder folder "
                     f"(config.json + model.safetensors, as in h94/IP-Adapter models/image_encoder) at "
                     f"{models_dir / IPADAPTER_FOLDER / 'image_encoder'}")


def load_image_encoder(folder: Path, dtype: torch.dtype):
    from transformers import CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"CLIP image encoder {folder} could not be loaded: {str(exc)[:200]}") from exc
    return encoder.requires_grad_(False).eval()


def feature_extractor_for(encoder):
    from transformers import CLIPImageProcessor

    size = int(encoder.config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@contextmanager
def loaded_into(pipe, states: list[dict], scales: list[float]) -> Iterator[None]:
    """Load IP-Adapter weights into `pipe` (its shared UNet) and restore the UNet after."""
    unet = pipe.unet
    backup = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
    try:
        pipe.load_ip_adapter(states, subfolder=[""] * len(states), weight_name=["unit"] * len(states),
                             image_encoder_folder=None)
        pipe.set_ip_adapter_scale(list(scales))
        yield
    finally:
        processors, hid_proj, hid_type = backup
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = hid_proj
        unet.register_to_config(encoder_hid_dim_type=hid_type)


_TITLE_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


def ip_adapter_entry(models_dir: Path, name: str,
                     known_sha256: Callable[[ModelEntry], str | None] | None = None) -> ModelEntry | None:
    """An IP-Adapter in models/ipadapter (not a registry folder) by file name or stem, also as
    an infotext title `name [hash]` (what pasting writes into the unit): the name without the
    hash, else the file whose sha256 (`known_sha256`, e.g. the registry's cached hashes) starts
    with the hash."""
    folder = models_dir / IPADAPTER_FOLDER
    if not folder.is_dir():
        return None
    query = (name or "").strip().replace("\\", "/")
    titled = _TITLE_HASH.match(query)
    wanted = titled["name"] if titled else query
    entries = [_entry(folder, path) for path in sorted(folder.rglob("*.safetensors"))
               if "image_encoder" not in path.relative_to(folder).parts]
    for entry in entries:
        rel = entry.name
        if wanted in (rel, rel.rsplit(".", 1)[0], entry.path.stem):
            return entry
    if titled and known_sha256 is not None:
        prefix = titled["hash"].lower()
        for entry in entries:
            known = known_sha256(entry)
            if known and known.lower().startswith(prefix):
                return entry
    return None


def _entry(folder: Path, path: Path) -> ModelEntry:
    stat = path.stat()
    return ModelEntry(kind="controlnet", name=path.relative_to(folder).as_posix(), path=path, format="safetensors",
                      arch=_unknown_arch(), size=stat.st_size, mtime=stat.st_mtime)


def ip_adapter_files(models_dir: Path) -> list[str]:
    folder = models_dir / IPADAPTER_FOLDER
    if not folder.is_dir():
        return []
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.safetensors"))
            if "image_encoder" not in p.relative_to(folder).parts]


def _unknown_arch():
    from pipelines.arch import Arch

    return Arch.UNKNOWN

