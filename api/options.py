"""The A1111 options the REST API reads and writes (`GET/POST /sdapi/v1/options`).

Only three options change anything in Easel: the checkpoint, the VAE and clip skip that API
requests use when they name none. They persist in config.json (A1111 keeps them there too).
Every other key GET returns is informational; POSTing any key back is accepted, a value equal
to the current one is a no-op, and keys that are unknown or security-related are ignored
silently, so clients that POST the whole dict back (Open WebUI) work.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from pipelines.outputs import atomic_write_json

CHECKPOINT = "sd_model_checkpoint"
VAE = "sd_vae"
CLIP_SKIP = "CLIP_stop_at_last_layers"
CHANGEABLE = (CHECKPOINT, VAE, CLIP_SKIP)
VAE_SPECIAL = ("Automatic", "None")

# Informational values that are true of Easel; never `forge_preset` (SillyTavern reads that
# key as "this is Forge").
_FIXED: Mapping[str, Any] = {
    "samples_save": True, "samples_format": "png", "save_to_dirs": True,
    "directories_filename_pattern": "[date]", "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images", "return_grid": False,
    "add_model_hash_to_info": True, "add_model_name_to_info": True,
    "add_vae_hash_to_info": True, "add_vae_name_to_info": True,
    "live_previews_enable": True, "show_progress_every_n_steps": 2, "eta_ddim": 0.0,
    "eta_ancestral": 1.0, "randn_source": "CPU", "sd_vae_overrides_per_model_preferences": True,
    "api_forbid_local_requests": True,
}
ENABLE_REQUESTS = "api_enable_requests"  # config.json only; the API cannot change it

LoadModel = Callable[[str, str], None]  # (checkpoint name, vae) -> loaded, or raises


class ApiOptions:
    def __init__(self, registry: Any, config_file: Path, load_model: LoadModel) -> None:
        self._registry = registry
        self._config_file = config_file
        self._load_model = load_model
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {CHECKPOINT: None, VAE: "Automatic", CLIP_SKIP: 1}
        stored = _read_json(config_file)
        for key in CHANGEABLE:
            if key in stored:
                self._values[key] = stored[key]
        self.allow_urls = stored.get(ENABLE_REQUESTS) is True
        if not self._values[CHECKPOINT]:
            # Pinned at start-up, as A1111 does: a checkpoint added later (a merge) that sorts
            # first must not silently become what API requests use.
            default = registry.default_checkpoint()
            self._values[CHECKPOINT] = default.name if default is not None else None

    # --- reading ---------------------------------------------------------------------------

    def checkpoint(self):
        """The ModelEntry API requests use by default (the option, else the default checkpoint)."""
        name = self._values[CHECKPOINT]
        if name:
            try:
                return self._registry.find("checkpoint", name)
            except ValueError:
                pass  # the file went away: fall back like a fresh install
        entry = self._registry.default_checkpoint()
        if entry is None:
            raise ValueError("No checkpoint found: put a .safetensors file in models/Stable-diffusion")
        return entry

    @property
    def vae(self) -> str:
        return self._values[VAE]

    @property
    def clip_skip(self) -> int:
        return int(self._values[CLIP_SKIP])

    def as_dict(self) -> dict[str, Any]:
        try:
            entry = self.checkpoint()
        except ValueError:
            entry = None
        return {
            CHECKPOINT: self._registry.title(entry) if entry else None,
            "sd_checkpoint_hash": self._registry.cached_sha256(entry) if entry else None,
            VAE: self.vae,
            CLIP_SKIP: self.clip_skip,
            ENABLE_REQUESTS: self.allow_urls,
            **_FIXED,
        }

    # --- writing ---------------------------------------------------------------------------

    def resolve(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """The canonical values of the changeable keys in `changes` (checkpoint -> its registry
        name), validated; unknown and read-only keys are dropped."""
        resolved: dict[str, Any] = {}
        if changes.get(CHECKPOINT) is not None:
            resolved[CHECKPOINT] = self._registry.find("checkpoint", str(changes[CHECKPOINT])).name
        if changes.get(VAE) is not None:
            vae = str(changes[VAE])
            resolved[VAE] = vae if vae in VAE_SPECIAL else self._registry.find("vae", vae).name
        if changes.get(CLIP_SKIP) is not None:
            try:
                clip_skip = int(changes[CLIP_SKIP])
            except (TypeError, ValueError):
                raise ValueError(f"{CLIP_SKIP} must be a whole number from 1 to 12, got {changes[CLIP_SKIP]!r}") from None
            if not 1 <= clip_skip <= 12:
                raise ValueError(f"{CLIP_SKIP} must be from 1 to 12, got {clip_skip}")
            resolved[CLIP_SKIP] = clip_skip
        return resolved

    def pending(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """What `apply(changes)` would change (validated; {} when the values are the current
        ones, as when a client posts the whole options dict back)."""
        resolved = self.resolve(changes)
        with self._lock:
            return self._changed(resolved)

    def _changed(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        current_checkpoint = self._current_checkpoint_name()
        return {k: v for k, v in resolved.items()
                if v != (current_checkpoint if k == CHECKPOINT else self._values[k])}

    def apply(self, changes: Mapping[str, Any], load: bool = True) -> None:
        """Set what changed; a new checkpoint or VAE is loaded first (A1111 loads inside the
        POST), and a load failure leaves the options as they were."""
        resolved = self.resolve(changes)
        with self._lock:
            current_checkpoint = self._current_checkpoint_name()
            changed = self._changed(resolved)
            if not changed:
                return
            if load and (CHECKPOINT in changed or VAE in changed):
                self._load_model(changed.get(CHECKPOINT, current_checkpoint), changed.get(VAE, self.vae))
            self._values.update(changed)
            self._save()

    def _current_checkpoint_name(self) -> str | None:
        try:
            return self.checkpoint().name
        except ValueError:
            return None

    def _save(self) -> None:
        stored = _read_json(self._config_file)
        stored.update({k: self._values[k] for k in CHANGEABLE if self._values[k] is not None})
        atomic_write_json(self._config_file, stored)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
