"""The VAE each checkpoint was last used with (data_dir/vae-preferences.json), so switching the
checkpoint brings its VAE back, as A1111's "remember VAE per checkpoint" does."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from pipelines.outputs import atomic_write_json


class VaePreferences:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, checkpoint: str | None) -> str | None:
        """The remembered VAE for a checkpoint label, or None when there is none."""
        if not checkpoint:
            return None
        return self._read().get(checkpoint)

    def set(self, checkpoint: str | None, vae: str | None) -> None:
        if not checkpoint or not vae:
            return
        with self._lock:
            data = self._read()
            if data.get(checkpoint) == vae:
                return
            data[checkpoint] = vae
            atomic_write_json(self.path, data)
