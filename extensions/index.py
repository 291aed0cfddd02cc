"""An extension index: a JSON file (local path or http(s) URL) listing installable extensions.

Shape (A1111's index uses the same keys): {"extensions": [{"name", "url", "description",
"tags": [...], "branch"?}]}; a bare list of such objects is accepted too.
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MAX_INDEX_BYTES = 16 << 20
FETCH_TIMEOUT_S = 30


@dataclass(frozen=True)
class IndexEntry:
    name: str
    url: str
    description: str = ""
    tags: tuple[str, ...] = ()
    branch: str | None = None


def read_index(location: str) -> list[IndexEntry]:
    location = (location or "").strip()
    if not location:
        raise ValueError("give the path or http(s) URL of an extension index JSON file")
    if location.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(location, timeout=FETCH_TIMEOUT_S) as response:
                raw = response.read(MAX_INDEX_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"cannot fetch the index {location}: {exc}") from exc
    else:
        path = Path(location.removeprefix("file://")).expanduser()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the index {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_INDEX_BYTES:
        raise ValueError("the index is larger than 16 MB; is it the right file?")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the index is not valid JSON: {exc}") from exc
    items = data.get("extensions") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError('the index must be {"extensions": [...]} or a list of extensions')
    entries = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue  # an entry without a URL cannot be installed
        tags = item.get("tags") or []
        entries.append(IndexEntry(name=str(item.get("name") or item["url"].rstrip("/").rsplit("/", 1)[-1]),
                                  url=item["url"], description=str(item.get("description") or ""),
                                  tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (),
                                  branch=item.get("branch") if isinstance(item.get("branch"), str) else None))
    return entries


def search_index(entries: list[IndexEntry], query: str) -> list[IndexEntry]:
    """Entries whose name, description or tags contain every word of the query (any case)."""
    words = (query or "").lower().split()
    def text(e: IndexEntry) -> str:
        return " ".join((e.name, e.description, " ".join(e.tags), e.url)).lower()
    return [e for e in entries if all(w in text(e) for w in words)]
