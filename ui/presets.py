"""Generation defaults per model family, read from presets/*.json (flat JSON, Fooocus-style,
with a schema_version and without a `default_` prefix on every key)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

SCHEMA_VERSION = 1
FORM_FIELDS = ("sampler", "schedule", "steps", "cfg_scale", "width", "height")


@dataclass(frozen=True)
class Preset:
    name: str = "fallback"
    description: str = ""
    architectures: tuple[str, ...] = ()
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512

    def form_values(self) -> dict:
        return {name: getattr(self, name) for name in FORM_FIELDS}


def load_preset(path: Path) -> Preset:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"preset {path} is not readable JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"preset {path} needs \"schema_version\": {SCHEMA_VERSION}")
    known = {f.name for f in fields(Preset)}
    unknown = sorted(set(data) - known - {"schema_version"})
    if unknown:
        raise ValueError(f"preset {path}: unknown key(s) {', '.join(unknown)}")
    values = dict(data)
    values.pop("schema_version")
    values["architectures"] = tuple(values.get("architectures", ()))
    for name, kind in (("steps", int), ("width", int), ("height", int), ("cfg_scale", float)):
        if name in values and not isinstance(values[name], (int, float)):
            raise ValueError(f"preset {path}: {name} must be a number, got {values[name]!r}")
        if name in values:
            values[name] = kind(values[name])
    return Preset(**values)


def load_presets(folder: Path) -> list[Preset]:
    """Every preset in the folder, sorted by file name; a missing folder gives none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [load_preset(path) for path in sorted(folder.glob("*.json"))]


def preset_for(arch: str | None, presets: list[Preset]) -> Preset:
    """The preset naming this architecture (Arch value), else the one named "default"."""
    for preset in presets:
        if arch in preset.architectures:
            return preset
    for preset in presets:
        if preset.name == "default":
            return preset
    return Preset()
