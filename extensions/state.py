"""Which extensions the user disabled, and the values of settings extensions declare.

Both live in the data dir: `extensions-state.json` ({"disabled": [...]}) next to the user's
`extensions/` folder, and the "extensions" object of config.json ({"<name>": {key: value}}).
Changes take effect at the next start, like A1111's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.outputs import atomic_write_json

STATE_FILE = "extensions-state.json"


class ExtensionState:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / STATE_FILE
        self.config_file = Path(data_dir) / "config.json"

    def disabled(self) -> set[str]:
        data = _read_json(self.path)
        names = data.get("disabled", [])
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def set_enabled(self, name: str, enabled: bool) -> None:
        data = _read_json(self.path)
        disabled = self.disabled()
        (disabled.discard if enabled else disabled.add)(name)
        data["disabled"] = sorted(disabled)
        atomic_write_json(self.path, data)

    def forget(self, name: str) -> None:
        """An uninstalled extension leaves no state behind."""
        if name in self.disabled():
            self.set_enabled(name, True)

    def setting_values(self) -> dict[str, dict[str, Any]]:
        section = _read_json(self.config_file).get("extensions", {})
        if not isinstance(section, dict):
            return {}
        return {k: v for k, v in section.items() if isinstance(v, dict)}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    return data if isinstance(data, dict) else {}
