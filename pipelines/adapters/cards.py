"""Extra-network cards (the A1111 "extra networks" view) for LoRAs, embeddings and
hypernetworks: what a card shows, built from the registry entry, the files beside it and the
user's `<stem>.json`, computed only for the cards asked for and cached per file version.

User data (A1111 keys): `<stem>.json` beside the model with "description", "activation text",
"preferred weight", "notes". It is written only where the model lives.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipelines.adapters import lora_files
from pipelines.outputs import atomic_write_json
from pipelines.registry import ModelEntry

PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".webp", ".preview.jpg", ".preview.webp")
USER_KEYS = ("description", "activation text", "preferred weight", "notes")
_TOP_TAGS = 20


@dataclass(frozen=True)
class Card:
    kind: str
    name: str  # registry name (relative path with extension)
    stem: str  # what a prompt tag uses
    alias: str  # kohya `ss_output_name`, else the stem
    base: str  # "SD1", "SDXL", ... or "unknown"
    preview: Path | None
    tags: tuple[tuple[str, int], ...]  # most frequent training tags (ss_tag_frequency)
    trigger_words: str  # the user's "activation text", else the top training tags
    description: str = ""
    notes: str = ""
    preferred_weight: float | None = None
    user: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def prompt_tag(self, weight: float | None = None) -> str:
        """What clicking the card inserts: `<lora:name:w>`, `<hypernet:name:w>`, or the
        embedding's word."""
        if self.kind == "embedding":
            return self.stem
        weight = self.preferred_weight if weight is None and self.preferred_weight is not None else weight
        weight = 1 if weight is None else weight
        prefix = "lora" if self.kind == "lora" else "hypernet"
        return f"<{prefix}:{self.stem}:{_number(weight)}>"


class CardCatalog:
    """Cards on demand, cached by (path, mtime, size) of the model and of its user file; at most
    `max_entries` kept (a folder of thousands costs only what is shown)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._cache: "OrderedDict[tuple, Card]" = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # cards computed (not served from the cache): for tests and stats

    def card(self, entry: ModelEntry) -> Card:
        user_file = user_file_for(entry)
        key = (entry.kind, str(entry.path), entry.mtime, entry.size, _stat_key(user_file))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        card = build_card(entry)
        with self._lock:
            self.built += 1
            self._cache[key] = card
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return card

    def search(self, entries: Iterable[ModelEntry], query: str = "", base: str = "", limit: int = 200) -> list[Card]:
        """Cards whose name, alias, trigger words or notes contain every word of `query`
        (case-insensitive) and whose base is `base` (any when empty), first `limit` only.
        Names are matched before cards are built, so a narrow query stays cheap."""
        words = query.lower().split()
        found = []
        for entry in entries:
            if base and lora_files.family(entry.arch) != base:
                continue
            if words and not all(w in entry.name.lower() for w in words):
                card = self.card(entry)
                haystack = " ".join((card.name, card.alias, card.trigger_words, card.notes, card.description)).lower()
                if not all(w in haystack for w in words):
                    continue
            found.append(self.card(entry))
            if len(found) >= limit:
                break
        return found


def build_card(entry: ModelEntry) -> Card:
    user = read_user_metadata(entry)
    tags = top_tags(entry.metadata.get("ss_tag_frequency", ""))
    weight = user.get("preferred weight")
    try:
        weight = float(weight) if weight not in (None, "", 0, "0") else None
    except (TypeError, ValueError):
        weight = None
    return Card(
        kind=entry.kind, name=entry.name, stem=entry.stem,
        alias=entry.metadata.get("ss_output_name") or entry.stem,
        base=lora_files.family(entry.arch), preview=find_preview(entry.path), tags=tags,
        trigger_words=str(user.get("activation text") or ", ".join(t for t, _ in tags[:8])),
        description=str(user.get("description") or ""), notes=str(user.get("notes") or ""),
        preferred_weight=weight, user=user)


def top_tags(tag_frequency_json: str, limit: int = _TOP_TAGS) -> tuple[tuple[str, int], ...]:
    """kohya `ss_tag_frequency` ({dataset: {tag: count}}) summed over datasets, most frequent first."""
    if not tag_frequency_json:
        return ()
    try:
        data = json.loads(tag_frequency_json)
    except ValueError:
        return ()
    totals: dict[str, int] = {}
    for tags in data.values() if isinstance(data, dict) else ():
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, (int, float)):
                    tag = str(tag).strip()
                    totals[tag] = totals.get(tag, 0) + int(count)
    return tuple(sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:limit])


def find_preview(model_path: Path) -> Path | None:
    base = model_path.with_name(model_path.name.rsplit(".", 1)[0] if model_path.is_file() else model_path.name)
    for suffix in PREVIEW_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def user_file_for(entry: ModelEntry) -> Path:
    return entry.path.with_name(entry.path.name.rsplit(".", 1)[0] + ".json")


def read_user_metadata(entry: ModelEntry) -> dict[str, Any]:
    path = user_file_for(entry)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged user file shows as empty; saving replaces it
    return data if isinstance(data, dict) else {}


def save_user_metadata(entry: ModelEntry, **values: Any) -> dict[str, Any]:
    """Merge `values` (keys with `_` for spaces: activation_text=, preferred_weight=, notes=,
    description=) into `<stem>.json`, keeping keys other tools wrote."""
    data = read_user_metadata(entry)
    for key, value in values.items():
        name = key.replace("_", " ")
        if name not in USER_KEYS:
            raise ValueError(f"unknown card field '{key}'; use one of {', '.join(USER_KEYS)}")
        if name == "preferred weight" and value not in (None, ""):
            value = float(value)
        data[name] = value
    atomic_write_json(user_file_for(entry), data)
    return data


def _stat_key(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def _number(value: float):
    return int(value) if float(value).is_integer() else value
