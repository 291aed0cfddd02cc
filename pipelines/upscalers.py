"""Upscalers: Lanczos and Nearest (always there), A1111's latent modes (for hires fix) and
model files from models/ESRGAN, RealESRGAN, DAT, HAT and SwinIR.

Model files are safetensors or weights-only pickles (read here, never unpickled with code).
spandrel detects the architecture from the weights and builds the model: ESRGAN / Real-ESRGAN
(RRDB), Real-ESRGAN Compact (SRVGG), SwinIR, Swin2SR, HAT, DAT, OmniSR, SPAN, ... When spandrel
cannot be imported (it needs torchvision), RRDB-ESRGAN files still load with our own
`pipelines.rrdb` and other architectures are refused with a clear message. Models run tiled with
overlap, so large images fit in memory; loaded models live in the manager's byte-budgeted cache.
A model upscale runs under the device lock the caller gives (the manager's, which a generation
holds), so it never shares the device with a generation.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

LANCZOS = "Lanczos"
NEAREST = "Nearest"
NONE = "None"
PIXEL_UPSCALERS = (LANCZOS, NEAREST)
# A1111's latent upscale modes: name -> (torch interpolate mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "DAT", "HAT", "SwinIR")
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 16


@dataclass(frozen=True)
class UpscalerModelFile:
    name: str  # the file stem, as A1111 names model upscalers
    path: Path
    folder: str


def model_files(models_dir: Path) -> list[UpscalerModelFile]:
    found = []
    for folder in MODEL_FOLDERS:
        root = Path(models_dir) / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
                found.append(UpscalerModelFile(name=path.stem, path=path, folder=folder))
    return found


def upscaler_names(models_dir: Path, latent: bool = False) -> list[str]:
    """What the UI offers: (latent modes,) None, Lanczos, Nearest, then model files."""
    names = list(LATENT_MODES) if latent else []
    return names + [NONE, *PIXEL_UPSCALERS] + [m.name for m in model_files(models_dir)]


def is_latent(name: str) -> bool:
    return name in LATENT_MODES


def upscale_latents(latents: torch.Tensor, mode_name: str, height: int, width: int,
                    vae_scale_factor: int = 8) -> torch.Tensor:
    """Latents [N, C, h, w] -> [N, C, height/f, width/f] with A1111's latent mode `mode_name`."""
    mode, antialias = LATENT_MODES[mode_name]
    size = (height // vae_scale_factor, width // vae_scale_factor)
    if mode in ("nearest", "nearest-exact"):
        return F.interpolate(latents, size=size, mode=mode)
    return F.interpolate(latents, size=size, mode=mode, antialias=antialias)


# --- pixel upscaling --------------------------------------------------------------------------

class Upscalers:
    """Resolves upscaler names for one models folder; models are loaded through `cache`
    (a ModelCache) and run on `device` while `device_lock()` is held (default: no lock)."""

    def __init__(self, models_dir: Path, cache: Any, device: torch.device, dtype: torch.dtype = torch.float32,
                 tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 device_lock: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.models_dir = Path(models_dir)
        self.cache = cache
        self.device = device
        self.dtype = dtype if device.type != "cpu" else torch.float32
        self.tile = tile
        self.overlap = overlap
        self.device_lock = device_lock

    @classmethod
    def for_manager(cls, manager: Any, **options: Any) -> "Upscalers":
        """The upscalers of the manager's models folder, on its device, cache and device lock: a
        model upscale waits for a running generation and a generation for a model upscale."""
        return cls(manager.registry.paths.models_dir, manager.cache, manager.device, manager.dtype,
                   device_lock=manager.device_lock, **options)

    def names(self, latent: bool = False) -> list[str]:
        return upscaler_names(self.models_dir, latent)

    def upscale(self, image: Image.Image, width: int, height: int, name: str) -> Image.Image:
        """`image` resized to exactly width x height with upscaler `name`. A model upscales by
        its native scale until the image is at least that large, then Lanczos fits it."""
        image = image.convert("RGB")
        if name in (NONE, LANCZOS, "", None):
            return image.resize((width, height), Image.LANCZOS)
        if name == NEAREST:
            return image.resize((width, height), Image.NEAREST)
        if is_latent(name):
            raise ValueError(f"{name} works on latents, only in hires fix; choose Lanczos or a model here")
        model = self.model(name)
        dtype = self.dtype if getattr(model, "supports_dtype", lambda _d: True)(self.dtype) else torch.float32
        current = image
        with self.device_lock():
            try:
                while current.width < width or current.height < height:
                    previous = current.size
                    current = run_tiled(model, current, self.tile, self.overlap, self.device, dtype)
                    if current.size[0] <= previous[0]:
                        break  # a 1x model (denoise/restore): once, then Lanczos to the size
            finally:
                if self.device.type != "cpu":
                    model.to("cpu")  # the cache holds it in RAM; the device is the checkpoint's
        if current.size != (width, height):
            current = current.resize((width, height), Image.LANCZOS)
        return current

    def model(self, name: str) -> torch.nn.Module:
        matches = [m for m in model_files(self.models_dir) if name in (m.name, m.path.name)]
        if not matches:
            raise ValueError(f"upscaler {name!r} not found: use Lanczos, Nearest or a model file in "
                             f"models/{{{','.join(MODEL_FOLDERS)}}}")
        path = matches[0].path
        stat = path.stat()
        return self.cache.get_or_load(("upscaler", str(path), stat.st_mtime, stat.st_size),
                                      lambda: load_upscaler_model(path))


def load_upscaler_model(path: Path, use_spandrel: bool = True) -> torch.nn.Module:
    """An upscaler model (called on [1, 3, H, W] RGB in [0, 1]) with a `scale` attribute.
    spandrel builds it when it can be imported (and `use_spandrel`); else RRDB-ESRGAN files load
    with `pipelines.rrdb`. ValueError when the file cannot be used."""
    from pipelines import rrdb

    state = read_weights(path)
    loader = _spandrel_loader() if use_spandrel else None
    if loader is not None:
        return _from_spandrel(loader, state, Path(path).name)
    if rrdb.is_rrdb(state):
        try:
            return rrdb.build_rrdb(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{Path(path).name} looks like ESRGAN but its weights do not fit: {exc}") from exc
    raise ValueError(f"{Path(path).name} is not an RRDB-ESRGAN model; other architectures (DAT, HAT, SwinIR, "
                     "Compact, ...) need the spandrel package (with torchvision), which does not import here")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler raises many types for unsafe/broken files
        raise ValueError(f"{path.name} is not a weights-only PyTorch file (refused: pickled code can run "
                         "arbitrary code); use a .safetensors release") from exc
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _spandrel_loader():
    """spandrel's ModelLoader, or None when spandrel (or the torchvision it imports) is missing."""
    try:
        from spandrel import ModelLoader
    except Exception:  # ImportError, or an error inside spandrel's imports of its architectures
        return None
    return ModelLoader()


class SpandrelUpscaler(torch.nn.Module):
    """A spandrel image-to-image model as an upscaler: `scale`, `architecture`, and a forward
    through spandrel's descriptor (which pads to the model's size requirements and crops back)."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.model = descriptor.model  # a submodule, so .to() and the cache's byte count see it
        self.scale = int(descriptor.scale)
        self.architecture = descriptor.architecture.name

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype == torch.float32 or (dtype == torch.float16 and self.descriptor.supports_half) \
            or (dtype == torch.bfloat16 and self.descriptor.supports_bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.descriptor(x)


def _from_spandrel(loader: Any, state: dict[str, torch.Tensor], name: str) -> SpandrelUpscaler:
    from spandrel import ImageModelDescriptor, UnsupportedModelError

    try:
        descriptor = loader.load_from_state_dict(state)
    except UnsupportedModelError:
        raise ValueError(f"{name}: spandrel does not know this model's architecture; use an ESRGAN, "
                         "Real-ESRGAN, SwinIR, HAT, DAT (or other spandrel-supported) upscaler file") from None
    except Exception as exc:
        raise ValueError(f"{name} could not be built from its weights: {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise ValueError(f"{name} is a {descriptor.architecture.name} {descriptor.purpose} model, not an "
                         "image upscaler; put only upscalers in the upscaler folders")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ValueError(f"{name} works on {descriptor.input_channels}-channel images; only RGB upscalers are used")
    descriptor.model.eval().requires_grad_(False)
    return SpandrelUpscaler(descriptor)


# --- tiling -----------------------------------------------------------------------------------

def image_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


@torch.no_grad()
def run_tiled(model: torch.nn.Module, image: Image.Image, tile: int, overlap: int,
              device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> Image.Image:
    """Run `model` over `image` in tiles of `tile` pixels, each read with `overlap` pixels of
    context on every side that are cut off again, so tiles meet without visible seams.
    tile <= 0 runs the whole image at once."""
    x = image_to_tensor(image)
    return tensor_to_image(run_tiled_tensor(model, x, tile, overlap, device, dtype))


@torch.no_grad()
def run_tiled_tensor(model: torch.nn.Module, x: torch.Tensor, tile: int, overlap: int,
                     device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                     on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    model = model.to(device=device, dtype=dtype)
    _, channels, height, width = x.shape
    if tile <= 0 or (height <= tile and width <= tile):
        return model(x.to(device, dtype)).float().cpu()
    scale = int(getattr(model, "scale", 0)) or None
    out = None
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    for row in range(rows):
        for col in range(cols):
            top, left = row * tile, col * tile
            bottom, right = min(top + tile, height), min(left + tile, width)
            ctop, cleft = max(top - overlap, 0), max(left - overlap, 0)
            cbottom, cright = min(bottom + overlap, height), min(right + overlap, width)
            result = model(x[:, :, ctop:cbottom, cleft:cright].to(device, dtype)).float().cpu()
            if scale is None:
                scale = result.shape[-1] // (cright - cleft)
            if out is None:
                out = torch.zeros((1, result.shape[1], height * scale, width * scale))
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = result[
                :, :, (top - ctop) * scale:(bottom - ctop) * scale, (left - cleft) * scale:(right - cleft) * scale]
            if on_tile is not None:
                on_tile(row * cols + col + 1, rows * cols)
    return out
