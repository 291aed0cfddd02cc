"""ControlUnit: one control unit of a request, with the fields and names of the A1111
ControlNet extension (Mikubill/sd-webui-controlnet), so UI, API and infotext share one shape.

A unit is frozen and validated; `to_dict`/`from_dict` round-trip it through JSON (the image as
base64 PNG); `from_a1111` reads what API clients send in `alwayson_scripts.ControlNet.args`;
`infotext_value`/`from_infotext` write and read `ControlNet N: "Module: ..., Weight: 1, ..."`.
"""
from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import numpy as np
from PIL import Image

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
NO_MODEL = "None"
# The unit's "Control Type": which kind of model it takes ("All": any). Model kinds as
# pipelines.control.models.model_kind names them.
UNIT_TYPES = ("All", "ControlNet", "T2I-Adapter", "IP-Adapter")
UNIT_TYPE_KINDS = {"ControlNet": "controlnet", "T2I-Adapter": "t2i_adapter", "IP-Adapter": "ip_adapter"}
# Older extension versions and some clients use these labels.
_RESIZE_ALIASES = {"scale to fit (inner fit)": "Crop and Resize", "envelope (outer fit)": "Resize and Fill",
                   "inner fit": "Crop and Resize", "outer fit": "Resize and Fill"}
_CONTROL_ALIASES = {"balanced": 0, "prompt": 1, "my prompt is more important": 1,
                    "controlnet": 2, "control": 2, "controlnet is more important": 2}


@dataclass(frozen=True)
class ControlUnit:
    enabled: bool = True
    module: str = "none"  # the preprocessor
    model: str = NO_MODEL  # a models/ControlNet entry (name, stem or "name [hash]")
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    pixel_perfect: bool = False
    processor_res: int = 512
    threshold_a: float = -1.0  # -1: the preprocessor's default
    threshold_b: float = -1.0
    unit_type: str = "All"  # one of UNIT_TYPES: the model must be of that kind
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_type", unit_type_name(self.unit_type))
        object.__setattr__(self, "control_mode", control_mode_name(self.control_mode))
        object.__setattr__(self, "resize_mode", resize_mode_name(self.resize_mode))
        object.__setattr__(self, "module", (self.module or "none").strip())
        object.__setattr__(self, "model", (self.model or NO_MODEL).strip() or NO_MODEL)
        problems = []
        if not 0.0 <= float(self.weight) <= 2.0:
            problems.append(f"ControlNet weight must be between 0 and 2, got {self.weight}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            problems.append("ControlNet guidance start/end must satisfy 0 <= start <= end <= 1, got "
                            f"{self.guidance_start}/{self.guidance_end}")
        if self.processor_res != -1 and not 64 <= int(self.processor_res) <= 4096:
            problems.append(f"ControlNet processor resolution must be between 64 and 4096, got {self.processor_res}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def active(self) -> bool:
        """Enabled and with a model: only such units take part in generation."""
        return bool(self.enabled) and self.model != NO_MODEL

    def with_changes(self, **changes: Any) -> "ControlUnit":
        return replace(self, **changes)

    # --- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["image"] = image_to_b64(self.image)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlUnit":
        if not isinstance(data, Mapping):
            raise ValueError("each ControlNet unit must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ControlNet unit field(s): {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("image"), str):
            values["image"] = b64_to_image(values["image"])
        return cls(**values)

    # --- the A1111 extension's API shape ---------------------------------------------------

    @classmethod
    def from_a1111(cls, data: Mapping[str, Any], where: str = "ControlNet unit") -> "ControlUnit":
        """A unit from `alwayson_scripts.ControlNet.args[i]` (sd-webui-controlnet field names and
        legacy aliases `guidance`, `lowvram`, `input_image`, `mask_image`). Fields that do not
        change the picture (low_vram, save_detected_map, hr_option, ...) are ignored; a unit mask
        is used as the extension uses it (`unit_mask_as_image`); `where` names the unit in errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"each {where} must be a JSON object")
        data, image, mask = a1111_image_fields(data, where)
        values: dict[str, Any] = {}
        for name in ("enabled", "module", "model", "pixel_perfect"):
            if name in data and data[name] is not None:
                values[name] = data[name]
        for name in ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b"):
            if data.get(name) is not None:
                values[name] = _float(data[name], name)
        res = data.get("processor_res", data.get("processor_resolution"))
        if res is not None:
            values["processor_res"] = int(_float(res, "processor_res"))
        if data.get("control_mode") is not None:
            values["control_mode"] = data["control_mode"]
        elif data.get("guessmode"):  # the extension's pre-1.1 flag
            values["control_mode"] = CONTROL_MODES[2]
        if data.get("resize_mode") is not None:
            values["resize_mode"] = data["resize_mode"]
        if _given(data.get("effective_region_mask")):
            raise ValueError(f"{where} effective_region_mask: regional ControlNet masks are not supported; "
                             "leave the field out")
        if isinstance(image, str):
            values["image"] = b64_to_image(image)
        elif isinstance(image, Image.Image):
            values["image"] = image
        if mask is not None:
            module = str(values.get("module") or "none")
            values.update(unit_mask_as_image(mask if isinstance(mask, Image.Image) else b64_to_image(mask),
                                             module, where))
        return cls(**values)

    # --- infotext ---------------------------------------------------------------------------

    def infotext_value(self, model_title: str | None = None) -> str:
        """The value after `ControlNet N: ` (unquoted), in the extension's order."""
        parts = [("Module", self.module), ("Model", model_title or self.model), ("Weight", _num(self.weight)),
                 ("Resize Mode", self.resize_mode), ("Processor Res", self.processor_res),
                 ("Threshold A", _num(self.threshold_a)), ("Threshold B", _num(self.threshold_b)),
                 ("Guidance Start", _num(self.guidance_start)), ("Guidance End", _num(self.guidance_end)),
                 ("Pixel Perfect", self.pixel_perfect), ("Control Mode", self.control_mode)]
        return ", ".join(f"{k}: {v}" for k, v in parts)

    @classmethod
    def from_infotext(cls, value: str) -> "ControlUnit":
        """A unit (without its image, which infotext cannot carry) from `ControlNet N`'s value."""
        pairs = dict(_split_pairs(value))
        table = {"Module": "module", "Model": "model", "Weight": "weight", "Resize Mode": "resize_mode",
                 "Processor Res": "processor_res", "Threshold A": "threshold_a", "Threshold B": "threshold_b",
                 "Guidance Start": "guidance_start", "Guidance End": "guidance_end",
                 "Pixel Perfect": "pixel_perfect", "Control Mode": "control_mode"}
        values: dict[str, Any] = {}
        for key, name in table.items():
            if key not in pairs:
                continue
            text = pairs[key]
            if name in ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end"):
                values[name] = _float(text, key)
            elif name == "processor_res":
                values[name] = int(_float(text, key))
            elif name == "pixel_perfect":
                values[name] = text.strip().lower() == "true"
            else:
                values[name] = text
        return cls(**values)


def units_from_infotext(params: Mapping[str, Any]) -> list[ControlUnit]:
    """Units from parsed infotext params (`ControlNet 0`, `ControlNet 1`, ...), in order.
    Unreadable entries are skipped: pasting restores what it can."""
    found = []
    for key, value in params.items():
        match = re.fullmatch(r"ControlNet (\d+)", str(key))
        if match and isinstance(value, str):
            try:
                found.append((int(match.group(1)), ControlUnit.from_infotext(value)))
            except ValueError:
                continue
    return [unit for _, unit in sorted(found, key=lambda pair: pair[0])]


def unit_type_name(value: Any) -> str:
    text = str(value or "All").strip()
    key = text.casefold().replace("_", "-").replace(" ", "-")
    for name in UNIT_TYPES:
        if key in (name.casefold(), name.casefold().replace("-", "")):
            return name
    raise ValueError(f"ControlNet unit type must be one of {', '.join(UNIT_TYPES)}, got {value!r}")


def control_mode_name(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return control_mode_name(int(text))
        key = text.casefold().replace("controlmode.", "")
        if key in _CONTROL_ALIASES:
            return CONTROL_MODES[_CONTROL_ALIASES[key]]
    raise ValueError(f"ControlNet control mode must be one of {', '.join(CONTROL_MODES)} (or 0, 1, 2), got {value!r}")


def resize_mode_name(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[value]
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return resize_mode_name(int(text))
        key = text.casefold().replace("resizemode.", "")
        for name in RESIZE_MODES:
            if key == name.casefold():
                return name
        if key in _RESIZE_ALIASES:
            return _RESIZE_ALIASES[key]
    raise ValueError(f"ControlNet resize mode must be one of {', '.join(RESIZE_MODES)} (or 0, 1, 2), got {value!r}")


def _split_pairs(value: str):
    for part in value.split(","):
        if ":" in part:
            key, _, text = part.partition(":")
            yield key.strip(), text.strip()


def _float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ControlNet {name} must be a number, got {value!r}") from None


def _num(value: float):
    return int(value) if float(value).is_integer() else value


def image_to_b64(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def b64_to_image(text: str) -> Image.Image:
    """Decoded through pipelines.uploads: size and pixel limits, bombs refused before decoding."""
    from pipelines.uploads import decode_image

    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("ControlNet image is not valid base64 PNG/JPEG/WebP data") from None
    try:
        return decode_image(data)
    except ValueError as exc:
        raise ValueError(f"ControlNet image: {exc}") from None


# --- the extension's unit image shapes and mask ------------------------------------------------

# sd-webui-controlnet `internal_controlnet/args.py` legacy names; giving both spellings is an error there too.
A1111_ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, (str, list, tuple, dict)) and not value)


def a1111_image_fields(data: Mapping[str, Any], where: str = "ControlNet unit") -> tuple[dict[str, Any], Any, Any]:
    """(the unit with aliases resolved, its image, its mask) from any shape the extension takes:
    `image` as base64, `{"image", "mask"}`, `[image, mask]` or a list of such dicts (the first
    is used), `mask` / `mask_image` beside it. Image and mask are returned as given (base64
    strings or PIL images; None when absent or empty)."""
    values = dict(data)
    for alias, name in A1111_ALIASES.items():
        if alias in values:
            if _given(values.get(name)) and _given(values[alias]):
                raise ValueError(f"{where}: give '{name}' or its old name '{alias}', not both")
            alias_value = values.pop(alias)
            if not _given(values.get(name)):
                values[name] = alias_value
    image, mask = values.pop("image", None), values.pop("mask", None)
    if isinstance(image, (list, tuple)):
        if image and isinstance(image[0], Mapping):
            image = image[0]
        elif len(image) <= 2:
            image, inner_mask = (list(image) + [None, None])[:2]
            if _given(mask) and _given(inner_mask):
                raise ValueError(f"{where}: the mask is given twice (in 'image' and in 'mask'); send one")
            mask = mask if _given(mask) else inner_mask
        else:
            raise ValueError(f"{where} image: a list must be [image, mask] or a list of {{image, mask}} objects")
    if isinstance(image, Mapping):
        inner_mask = image.get("mask")
        image = image.get("image")
        if _given(mask) and _given(inner_mask):
            raise ValueError(f"{where}: the mask is given twice (in 'image' and in 'mask'); send one")
        mask = mask if _given(mask) else inner_mask
    return values, (image if _given(image) else None), (mask if _given(mask) else None)


def unit_mask_as_image(mask: Image.Image, module: str, where: str = "ControlNet unit") -> dict[str, Any]:
    """What a unit's mask does, as in sd-webui-controlnet: a mask that is all black or all white
    (what an untouched sketch canvas sends) means no mask; any other mask becomes the control
    image itself (its first channel, white lines on black) with preprocessor "none". Inpaint
    preprocessors, which would use it as an inpainting mask, are not in Easel: refused."""
    if "inpaint" in module.casefold():
        raise ValueError(f"{where} mask: the '{module}' inpaint preprocessor is not available in Easel, "
                         "so its mask cannot be used; inpaint with the request's own mask instead")
    channel = np.asarray(mask.convert("RGB"))[..., 0]
    if (channel <= 5).all() or (channel >= 250).all():
        return {}
    return {"image": Image.fromarray(np.ascontiguousarray(channel), "L").convert("RGB"), "module": "none"}


# --- GLIGEN boxes ----------------------------------------------------------------------------

GLIGEN_MAX_BOXES = 30  # the GLIGEN position net's object slots


def normalize_gligen_boxes(value: Any) -> tuple[tuple[str, float, float, float, float], ...]:
    """GLIGEN grounding boxes as (phrase, x0, y0, x1, y1) with corners as fractions of the image
    (0-1, x0 < x1, y0 < y1). Accepts such tuples/lists, dicts with phrase/box, or text lines
    `phrase: x0, y0, x1, y1`."""
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError("GLIGEN boxes must be a list of (phrase, x0, y0, x1, y1)")
    boxes = []
    for item in value:
        if isinstance(item, str):
            phrase, sep, coords = item.rpartition(":")
            parts = [phrase.strip()] + [c for c in re.split(r"[,\s]+", coords.strip()) if c] if sep else [item]
        elif isinstance(item, Mapping):
            parts = [item.get("phrase", "")] + list(item.get("box") or [])
        else:
            parts = list(item)
        if len(parts) != 5 or not str(parts[0]).strip():
            raise ValueError(f"GLIGEN box {item!r}: write it as 'phrase: x0, y0, x1, y1' (fractions 0-1)")
        x0, y0, x1, y1 = (_float(v, "box corner") for v in parts[1:])
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"GLIGEN box for '{parts[0]}': corners must satisfy 0 <= x0 < x1 <= 1 and "
                             f"0 <= y0 < y1 <= 1, got {x0}, {y0}, {x1}, {y1}")
        boxes.append((str(parts[0]).strip(), x0, y0, x1, y1))
    if len(boxes) > GLIGEN_MAX_BOXES:
        raise ValueError(f"GLIGEN takes at most {GLIGEN_MAX_BOXES} boxes, got {len(boxes)}")
    return tuple(boxes)
