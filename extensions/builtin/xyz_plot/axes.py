"""The axis types of the X/Y/Z plot: how a text box's values are read and applied to a request."""
from __future__ import annotations

import csv
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable

from pipelines.request import GenerationRequest, data_fields

_UINT = r"\d+"
_UFLOAT = r"(?:\d+(?:\.\d*)?|\.\d+)"
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]*)(:[^>]*)?>")
MAX_VALUES = 100


@dataclass(frozen=True)
class AxisType:
    label: str
    parse: Callable[[str], list]
    apply: Callable[[GenerationRequest, Any], GenerationRequest]
    check: Callable[[GenerationRequest, list], None] = lambda _base, _values: None


@dataclass(frozen=True)
class Axis:
    type: AxisType
    values: tuple

    @property
    def is_nothing(self) -> bool:
        return self.type.label == NOTHING

    def labels(self) -> list[str]:
        if self.is_nothing:
            return [""]
        # Prompt S/R values are (search, replacement) pairs: the label shows the replacement
        return [f"{self.type.label}: {_describe(v[1] if isinstance(v, tuple) else v)}" for v in self.values]


def split_values(text: str) -> list[str]:
    """Comma-separated, with "double quotes" around values that contain commas."""
    rows = list(csv.reader([text.replace("\n", ",")], skipinitialspace=True)) if text.strip() else [[]]
    return [v.strip() for v in rows[0] if v.strip()]


def _expand(text: str, unsigned: str, cast: Callable[[str], Any]) -> list:
    """`1-5`, `1-10 (+3)` (step), `1-10 [4]` (count), or single numbers."""
    values: list = []
    number = rf"[+-]?{unsigned}"
    for part in split_values(text):
        step = re.fullmatch(rf"({number})\s*-\s*({number})\s*\(\s*([+-]\s*{unsigned})\s*\)", part)
        count = re.fullmatch(rf"({number})\s*-\s*({number})\s*\[\s*(\d+)\s*\]", part)
        plain_range = re.fullmatch(rf"({number})\s*-\s*({number})", part)
        try:
            if step:
                start, end, inc = cast(step[1]), cast(step[2]), cast(step[3].replace(" ", ""))
                if inc == 0 or (end - start) * inc < 0:
                    raise ValueError
                n = int((end - start) / inc + 1e-9) + 1
                values += [cast(start + i * inc) if cast is int else round(start + i * inc, 6) for i in range(n)]
            elif count:
                start, end, n = cast(count[1]), cast(count[2]), int(count[3])
                if n < 1:
                    raise ValueError
                span = [start + (end - start) * i / max(1, n - 1) for i in range(n)]
                values += [int(round(v)) if cast is int else round(v, 6) for v in span]
            elif plain_range and cast is int:
                start, end = int(plain_range[1]), int(plain_range[2])
                values += list(range(start, end + 1) if end >= start else range(start, end - 1, -1))
            else:
                values.append(cast(part))
        except ValueError:
            raise ValueError(f"cannot read {part!r} as numbers: use 1, 2, 3 or 1-5 or 1-10 (+2) or 1-10 [4]") from None
        if len(values) > MAX_VALUES:
            raise ValueError(f"at most {MAX_VALUES} values per axis")
    return values


def parse_ints(text: str) -> list[int]:
    return _expand(text, _UINT, int)


def parse_floats(text: str) -> list[float]:
    return _expand(text, _UFLOAT, float)


def parse_strings(text: str) -> list[str]:
    return split_values(text)


def _set(field: str):
    return lambda request, value: request.with_changes(**{field: value})


def _check_prompt_sr(base: GenerationRequest, values: list) -> None:
    if values and values[0] not in base.prompt and values[0] not in base.negative_prompt:
        raise ValueError(f"Prompt S/R: the first value {values[0]!r} is not in the prompt; the first value "
                         f"is what gets replaced by each of the others")


def _check_hires(base: GenerationRequest, _values: list) -> None:
    if not base.enable_hr:
        raise ValueError("the Hires axes vary the hires fix: tick Hires fix first")


def parse_bools(text: str) -> list[bool]:
    out = []
    for value in split_values(text):
        if value.lower() not in _BOOLS:
            raise ValueError(f"cannot read {value!r} as true/false: use true, false, yes, no, 1 or 0")
        out.append(_BOOLS[value.lower()])
    return out


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
# Request fields the generic axis cannot vary: images, structured values and the app's tables.
_NOT_AXIS_FIELDS = ("init_image", "mask", "control_units", "gligen_boxes", "styles", "task")


def field_parser(name: str) -> Callable[[str], list]:
    """How the generic axis reads values for request field `name` (by the field's default)."""
    allowed = sorted(data_fields() - set(_NOT_AXIS_FIELDS))
    if name not in allowed:
        raise ValueError(f"'{name}' is not a request field the plot can vary; use one of: {', '.join(allowed)}")
    default = next(f.default for f in fields(GenerationRequest) if f.name == name)
    if default is MISSING:
        return parse_strings
    if isinstance(default, bool):
        return parse_bools
    if isinstance(default, int):
        return parse_ints
    if isinstance(default, float):
        return parse_floats
    return parse_strings


def request_field_axis(text: str) -> tuple["AxisType", list]:
    """The generic axis: `field_name: value, value, ...`, e.g. `hr_scale: 1.5, 2`."""
    name, sep, values = (text or "").partition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError("Request field axis: write the field name, a colon, then the values, "
                         "e.g. 'hr_scale: 1.5, 2'")
    parse = field_parser(name)
    return AxisType(name, parse, _set(name)), parse(values)


def _check_lora(base: GenerationRequest, _values: list) -> None:
    if not _LORA_TAG.search(base.prompt):
        raise ValueError("LoRA weight: the prompt has no <lora:name:weight> tag to vary")


def set_lora_weight(request: GenerationRequest, weight: float) -> GenerationRequest:
    """Every <lora:name:w> tag of the prompt gets weight `weight` (A1111 tag syntax)."""
    text = _LORA_TAG.sub(lambda m: f"<lora:{m[1]}:{_describe(weight)}{m[3] or ''}>", request.prompt)
    return request.with_changes(prompt=text)


def _describe(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


NOTHING = "Nothing"
REQUEST_FIELD = "Request field"


def axis_types() -> dict[str, AxisType]:
    types = [
        AxisType(NOTHING, lambda _text: [None], lambda request, _value: request),
        AxisType("Seed", parse_ints, _set("seed")),
        AxisType("Steps", parse_ints, _set("steps")),
        AxisType("CFG Scale", parse_floats, _set("cfg_scale")),
        AxisType("Sampler", parse_strings, _set("sampler")),
        AxisType("Schedule type", parse_strings, _set("schedule")),
        AxisType("Checkpoint", parse_strings, _set("checkpoint")),
        AxisType("VAE", parse_strings, _set("vae")),
        AxisType("Denoising", parse_floats, _set("denoising_strength")),
        AxisType("Width", parse_ints, _set("width")),
        AxisType("Height", parse_ints, _set("height")),
        AxisType("Clip skip", parse_ints, _set("clip_skip")),
        AxisType("Hires steps", parse_ints, _set("hr_second_pass_steps"), _check_hires),
        # in txt2img with the hires fix on, denoising strength is the hires pass's
        AxisType("Hires denoise", parse_floats, _set("denoising_strength"), _check_hires),
        # S/R needs the search term (the first value): `apply` gets (search, replacement) pairs.
        AxisType("Prompt S/R", parse_strings,
                 lambda request, pair: request.with_changes(
                     prompt=request.prompt.replace(pair[0], pair[1]),
                     negative_prompt=request.negative_prompt.replace(pair[0], pair[1])),
                 _check_prompt_sr),
        AxisType("LoRA weight", parse_floats, set_lora_weight, _check_lora),
        # any other request field: `field_name: values` (make_axis builds the field's own type)
        AxisType(REQUEST_FIELD, parse_strings, lambda request, _value: request),
    ]
    return {t.label: t for t in types}


def make_axis(label: str, text: str, base: GenerationRequest) -> Axis:
    types = axis_types()
    if label not in types:
        raise ValueError(f"unknown axis type {label!r}: use one of {', '.join(types)}")
    axis_type = types[label]
    if label == REQUEST_FIELD:
        axis_type, values = request_field_axis(text)
    else:
        values = axis_type.parse(text or "")
    if not values:
        raise ValueError(f"the {axis_type.label} axis has no values: type them separated by commas")
    axis_type.check(base, values)
    if label == "Prompt S/R":
        return Axis(axis_type, tuple((values[0], v) for v in values))
    return Axis(axis_type, tuple(values))
