"""GenerationRequest / GenerationResult: one frozen, validated description of a generation.

The UI handlers and the REST API both build this object; every bad combination is rejected
here with a message that says what to change, before any model is touched.
"""
from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from pipelines import hires, refiner, samplers
from pipelines.additions import NO_ADDITIONS, EngineAdditions
from pipelines.control.units import ControlUnit, normalize_gligen_boxes

TASKS = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
INPAINT_FILLS = ("fill", "original")
MAX_SEED = 2**32 - 1
_IMAGE_FIELDS = ("init_image", "mask")
_NOT_DATA = ("additions",)  # not part of to_dict / from_dict


@dataclass(frozen=True)
class GenerationRequest:
    task: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    checkpoint: str | None = None  # None: the manager's default checkpoint
    vae: str = "Automatic"
    sampler: str = "Euler a"
    schedule: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    subseed: int = -1  # A1111 variation seed; -1: random, resolved per request like seed
    subseed_strength: float = 0.0  # 0: the plain seed's noise, bit for bit; 1: the subseed's
    batch_count: int = 1
    batch_size: int = 1
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    denoising_strength: float = 0.75
    resize_mode: str = "just resize"
    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    mask_blur: int = 4
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    save_images: bool = True
    control_units: tuple[ControlUnit, ...] = ()
    gligen_model: str = ""  # models/gligen file; with gligen_boxes: (phrase, x0, y0, x1, y1) fractions
    gligen_boxes: tuple[tuple[str, float, float, float, float], ...] = ()
    # hires fix and SDXL refiner (A1111 API names; pipelines/hires.py, pipelines/refiner.py)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint: str | None = None  # None / "Use same checkpoint"
    hr_sampler: str | None = None  # None / "Use same sampler"
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = 0.8
    styles: tuple[str, ...] = ()  # names from data/styles.csv, applied in order before parsing
    clip_skip: int = 1  # A1111 "Clip skip" 1..12
    emphasis: str = "Original"  # A1111 emphasis mode: "Original" (mean restored) or "No norm"
    wildcard_mode: str = "random"  # "random" or "combinatorial" over the batch
    tiling: bool = False  # A1111 "Tiling": circular padding in the UNet and VAE, a seamless picture
    # what extensions add (samplers, preprocessors): the app's tables, not data (pipelines/additions.py)
    additions: EngineAdditions | None = field(default=NO_ADDITIONS, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.additions is None:
            object.__setattr__(self, "additions", NO_ADDITIONS)
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))
        sampler, schedule = samplers.resolve(self.sampler, self.schedule, self.additions.samplers)
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "resize_mode", _resize_mode_name(self.resize_mode))
        object.__setattr__(self, "control_units", _control_units(self.control_units))
        object.__setattr__(self, "styles", tuple(self.styles))
        object.__setattr__(self, "gligen_boxes", normalize_gligen_boxes(self.gligen_boxes))

    def _problems(self):
        if self.task not in TASKS:
            yield f"task must be one of {', '.join(TASKS)}, got '{self.task}'"
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value % 8 or not 64 <= value <= 4096:
                yield f"{name} must be a multiple of 8 between 64 and 4096, got {value}"
        if not 1 <= self.steps <= 500:
            yield f"steps must be between 1 and 500, got {self.steps}"
        if not 0 <= self.cfg_scale <= 100:
            yield f"CFG scale must be between 0 and 100, got {self.cfg_scale}"
        if self.seed != -1 and not 0 <= self.seed <= MAX_SEED:
            yield f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}"
        if self.subseed != -1 and not 0 <= self.subseed <= MAX_SEED:
            yield f"variation seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.subseed}"
        if not 0.0 <= self.subseed_strength <= 1.0:
            yield f"variation strength must be between 0 and 1, got {self.subseed_strength}"
        elif self.subseed_strength > 0 and self.task != "txt2img":
            # the img2img/inpaint pipelines draw their noise inside and take no start latents
            yield "variation seeds work in txt2img only for now; set the variation strength to 0"
        if not 1 <= self.batch_count <= 100:
            yield f"batch count must be between 1 and 100, got {self.batch_count}"
        if not 1 <= self.batch_size <= 64:
            yield f"batch size must be between 1 and 64, got {self.batch_size}"
        if not 0.0 <= self.denoising_strength <= 1.0:
            yield f"denoising strength must be between 0 and 1, got {self.denoising_strength}"
        if self.task in ("img2img", "inpaint") and self.init_image is None:
            yield f"{self.task} needs an init image: upload one first"
        if self.task == "inpaint" and self.mask is None:
            yield "inpaint needs a mask: draw on the image or upload a mask"
        if _resize_mode_name(self.resize_mode) is None:
            yield f"resize mode must be one of {', '.join(RESIZE_MODES)}, got '{self.resize_mode}'"
        if self.inpainting_fill not in INPAINT_FILLS:
            yield f"masked content must be one of {', '.join(INPAINT_FILLS)}, got '{self.inpainting_fill}'"
        if not 0 <= self.mask_blur <= 256:
            yield f"mask blur must be between 0 and 256, got {self.mask_blur}"
        if not isinstance(self.styles, (list, tuple)) or not all(isinstance(s, str) for s in self.styles):
            yield "styles must be a list of style names"
        if not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            yield f"clip skip must be a whole number from 1 to 12, got {self.clip_skip}"
        if self.emphasis not in ("Original", "No norm"):
            yield f"emphasis must be Original or No norm, got '{self.emphasis}'"
        if self.wildcard_mode not in ("random", "combinatorial"):
            yield f"wildcard mode must be random or combinatorial, got '{self.wildcard_mode}'"
        if not isinstance(self.tiling, bool):
            yield f"tiling must be true or false, got {self.tiling!r}"
        if not 0 <= self.inpaint_full_res_padding <= 1024:
            yield f"masked area padding must be between 0 and 1024, got {self.inpaint_full_res_padding}"
        yield from hires.problems(self)
        yield from refiner.problems(self)

    @property
    def total_images(self) -> int:
        return self.batch_count * self.batch_size

    def with_changes(self, **changes: Any) -> "GenerationRequest":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_DATA}
        for name in _IMAGE_FIELDS:
            data[name] = _image_to_b64(data[name])
        data["control_units"] = [unit.to_dict() for unit in self.control_units]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], additions: EngineAdditions | None = None) -> "GenerationRequest":
        known = data_fields()
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
        values = dict(data)
        for name in _IMAGE_FIELDS:
            if isinstance(values.get(name), str):
                values[name] = _b64_to_image(values[name])
        return cls(**values, additions=additions)


def data_fields() -> set[str]:
    """The request's data fields (what to_dict writes and from_dict reads)."""
    return {f.name for f in fields(GenerationRequest) if f.name not in _NOT_DATA}


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    paths: list[Path]
    interrupted: bool = False
    subseeds: list[int] = field(default_factory=list)  # each image's resolved variation seed
    warnings: list[str] = field(default_factory=list)  # e.g. a LoRA whose layers only partly matched

    def as_json(self) -> dict[str, Any]:
        data = asdict(self) | {"images": None}
        data["paths"] = [str(p) for p in self.paths]
        return data


def _control_units(units: Any) -> tuple[ControlUnit, ...]:
    if not isinstance(units, (list, tuple)):
        raise ValueError("control_units must be a list of ControlNet units")
    return tuple(u if isinstance(u, ControlUnit) else ControlUnit.from_dict(u) for u in units)


def _resize_mode_name(value: Any) -> str | None:
    if isinstance(value, int) and 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[value]
    if isinstance(value, str) and value.lower() in RESIZE_MODES:
        return value.lower()
    return None


def _image_to_b64(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _b64_to_image(text: str) -> Image.Image:
    from pipelines.uploads import decode_image

    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("image is not valid base64 PNG/JPEG/WebP data") from None
    return decode_image(data)
