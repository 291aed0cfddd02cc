"""`extension.toml`: what an extension says about itself, read and checked before any of its
code is imported."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

API_VERSION = 1  # bump when a documented API call or hook contract changes incompatibly
MANIFEST_NAME = "extension.toml"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    api_version: int
    description: str = ""
    homepage: str = ""
    requirements: tuple[str, ...] = ()

    @property
    def api_compatible(self) -> bool:
        return self.api_version == API_VERSION

    def api_mismatch_message(self) -> str:
        return (f"extension '{self.name}' needs extension API v{self.api_version}, Easel provides "
                f"v{API_VERSION}: update the extension (or Easel)")


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate `folder/extension.toml`; ValueError says what to fix."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{folder.name}: no {MANIFEST_NAME}; an extension folder needs one")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as TOML ({exc})") from exc
    return manifest_from_dict(data, where=str(path))


def manifest_from_dict(data: dict, where: str = "extension.toml") -> Manifest:
    missing = [key for key in ("name", "version", "api_version") if key not in data]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    name = data["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"{where}: name must be lower-case letters, digits, '-' or '_' "
                         f"(at most 64), got {name!r}")
    api_version = data["api_version"]
    if isinstance(api_version, bool) or not isinstance(api_version, int):
        raise ValueError(f"{where}: api_version must be an integer, got {api_version!r}")
    requirements = data.get("requirements", [])
    if not isinstance(requirements, list) or not all(isinstance(r, str) for r in requirements):
        raise ValueError(f"{where}: requirements must be a list of pip requirement strings")
    for key in ("version", "description", "homepage"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{where}: {key} must be a string")
    return Manifest(name=name, version=data["version"], api_version=api_version,
                    description=data.get("description", ""), homepage=data.get("homepage", ""),
                    requirements=tuple(r.strip() for r in requirements if r.strip()))
