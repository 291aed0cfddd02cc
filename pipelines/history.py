"""The history index: one record per saved image (path, owner, a summary of its infotext), kept
in `data/history.json` so "my past results" is a lookup instead of a walk over every PNG.

The images are the truth and the index is derived from them:
- `OutputStore.save` records each new image with its owner (`add`); for a logged-in owner
  (`user:<login>`) the owner is also written into the PNG (`easel_owner` text chunk), so a
  rebuilt index knows it again. Session and anonymous owners stay in the index only: a
  Gradio session id in a shared file would let others act as that session.
- On start `load_or_rebuild()` reads the index; a missing or corrupt index is rebuilt from the
  files (their infotext and owner chunk, headers only), and a stale one (files added, changed
  or deleted behind its back, e.g. Extras outputs or a crash between saving and recording) is
  brought up to date, keeping what still matches by size and mtime.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from pipelines.metadata import read_infotext, split_infotext
from pipelines.outputs import OWNER_CHUNK, atomic_write_json

log = logging.getLogger("easel.history")
INDEX_NAME = "history.json"
INDEX_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SUMMARY_CHARS = 200
_SUMMARY_PARAMS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model")


def persisted_owner(owner: str | None) -> str | None:
    """The owner to write into the image itself: logins only."""
    return owner if owner and owner.startswith("user:") else None


@dataclass(frozen=True)
class HistoryEntry:
    path: str  # relative to the outputs folder, `/` separators
    owner: str  # "user:<login>", "session:<id>", "api:<address>"; "" when unknown
    category: str  # txt2img-images, img2img-images, extras-images, ...
    size: int
    mtime: float
    prompt: str = ""  # the first SUMMARY_CHARS characters
    negative_prompt: str = ""
    params: tuple[tuple[str, str], ...] = ()  # Steps, Sampler, CFG scale, Seed, Size, Model when present

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["params"] = dict(self.params)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "HistoryEntry":
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise ValueError("not a history entry")
        values = dict(data)
        params = values["params"]
        if not isinstance(params, dict):
            raise ValueError("history entry params must be an object")
        values["params"] = tuple((str(k), str(v)) for k, v in params.items())
        entry = cls(**values)
        if not (isinstance(entry.path, str) and isinstance(entry.owner, str) and isinstance(entry.size, int)
                and isinstance(entry.mtime, (int, float))):
            raise ValueError("history entry fields have the wrong types")
        return entry


def summarize(infotext: str | None) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not infotext:
        return "", "", ()
    try:
        prompt, negative, params = split_infotext(infotext)
    except ValueError:
        return "", "", ()
    picked = tuple((key, str(params[key])) for key in _SUMMARY_PARAMS if key in params)
    return prompt[:SUMMARY_CHARS], negative[:SUMMARY_CHARS], picked


class HistoryIndex:
    """The index of the images under `outputs_root`, stored in `index_file`. Thread-safe."""

    def __init__(self, index_file: str | os.PathLike, outputs_root: str | os.PathLike) -> None:
        self.index_file = Path(index_file)
        self.outputs_root = Path(outputs_root)
        self._lock = threading.Lock()
        self._entries: dict[str, HistoryEntry] = {}

    # --- recording ---------------------------------------------------------------------------

    def add(self, path: str | os.PathLike, owner: str | None, infotext: str | None) -> HistoryEntry:
        """Record a just-saved image (called by OutputStore.save)."""
        entry = self._entry(Path(path), owner or "", infotext)
        with self._lock:
            self._entries[entry.path] = entry
            self._write()
        return entry

    def entries(self, owner: str | None = None, limit: int | None = None) -> list[HistoryEntry]:
        """Newest first; only `owner`'s when given (None: everyone's)."""
        with self._lock:
            chosen = [e for e in self._entries.values() if owner is None or e.owner == owner]
        chosen.sort(key=lambda e: (e.mtime, e.path), reverse=True)
        return chosen[:limit] if limit is not None else chosen

    def absolute(self, entry: HistoryEntry) -> Path:
        return self.outputs_root / entry.path

    def public_entry(self, entry: HistoryEntry) -> dict[str, Any]:
        """An entry as the /history views show it. The relative path is `relative_path`, never
        `path`: gradio_client takes any JSON object with a string "path" for a file to
        download, and a relative one is not servable."""
        data = entry.to_json()
        data["relative_path"] = data.pop("path")
        data["file"] = str(self.absolute(entry))
        return data

    # --- start-up ----------------------------------------------------------------------------

    def load_or_rebuild(self) -> str:
        """Read the index, then make it match the files. Returns what happened, for the log:
        "loaded", "rebuilt (missing)", "rebuilt (corrupt)" or "updated (stale: +A ~C -D)"."""
        try:
            loaded = self._read()
            state = "loaded"
        except FileNotFoundError:
            loaded, state = {}, "rebuilt (missing)"
        except (OSError, ValueError) as exc:
            log.warning("history index %s is unreadable (%s); rebuilding it from the images", self.index_file, exc)
            loaded, state = {}, "rebuilt (corrupt)"
        current: dict[str, HistoryEntry] = {}
        added = changed = 0
        for path, stat in self._image_files():
            rel = self._relative(path)
            known = loaded.get(rel)
            if known is not None and known.size == stat.st_size and known.mtime == stat.st_mtime:
                current[rel] = known
                continue
            owner = known.owner if known is not None else ""
            current[rel] = self._entry(path, owner, None, stat)
            added, changed = (added, changed + 1) if known is not None else (added + 1, changed)
        removed = len(set(loaded) - set(current))
        with self._lock:
            self._entries = current
            if state != "loaded" or added or changed or removed:
                self._write()
        if state == "loaded" and (added or changed or removed):
            state = f"updated (stale: +{added} ~{changed} -{removed})"
        return state

    # --- files -------------------------------------------------------------------------------

    def _read(self) -> dict[str, HistoryEntry]:
        data = json.loads(self.index_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or not isinstance(data.get("entries"), list):
            raise ValueError(f"not a version {INDEX_VERSION} history index")
        entries = [HistoryEntry.from_json(item) for item in data["entries"]]
        return {e.path: e for e in entries}

    def _write(self) -> None:  # caller holds the lock
        atomic_write_json(self.index_file, {"version": INDEX_VERSION,
                                            "entries": [e.to_json() for e in self._entries.values()]}, indent=None)

    def _image_files(self) -> Iterator[tuple[Path, os.stat_result]]:
        for folder, dirs, files in os.walk(self.outputs_root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                path = Path(folder) / name
                try:
                    yield path, path.stat()
                except OSError:
                    continue

    def _entry(self, path: Path, owner: str, infotext: str | None,
               stat: os.stat_result | None = None) -> HistoryEntry:
        """An entry for `path`; the infotext (and a logged-in owner) is read from the file
        header when not given."""
        stat = stat or path.stat()
        if infotext is None:
            infotext, stored_owner = _read_header(path)
            owner = owner or stored_owner or ""
        rel = self._relative(path)
        parts = rel.split("/")
        prompt, negative, params = summarize(infotext)
        return HistoryEntry(path=rel, owner=owner, category=parts[0] if len(parts) > 1 else "", size=stat.st_size,
                            mtime=stat.st_mtime, prompt=prompt, negative_prompt=negative, params=params)


    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.outputs_root).as_posix()
        except ValueError:  # the same folder spelled another way (a symlink, a relative path)
            return path.resolve().relative_to(self.outputs_root.resolve()).as_posix()


def _read_header(path: Path) -> tuple[str | None, str | None]:
    """(infotext, owner chunk) from the image's metadata, without decoding its pixels."""
    try:
        with Image.open(path) as image:
            owner = image.info.get(OWNER_CHUNK)
            return read_infotext(image), persisted_owner(owner if isinstance(owner, str) else None)
    except Exception:  # not an image after all, or damaged: listed without a summary
        return None, None
