"""Pasted infotext and renamed files: the `Lora hashes`, `TI hashes` and `Hypernet hashes` keys
say which file each name in the prompt was, so a LoRA, embedding or hypernetwork renamed since
is found by its hash and the prompt rewritten to its current name (A1111 does this for LoRAs).

Order for each name: a file whose known hash matches (cache.json, kohya's `sshs_model_hash`),
else the file that still has the name, else files whose hash is not known yet are hashed, up to
`hash_budget_bytes` per paste, so pasting never starts hours of hashing on a big folder.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from pipelines.registry import ModelEntry, ModelNotFoundError, ModelRegistry

_NAME_SEPARATORS = str.maketrans("", "", ":,")
HASH_BUDGET_BYTES = 2 << 30


def restore_renamed(registry: ModelRegistry, parsed: dict[str, Any],
                    hash_budget_bytes: int = HASH_BUDGET_BYTES) -> dict[str, Any]:
    """`parsed` (parse_infotext's fields) with `Prompt` / `Negative prompt` naming the files
    the hashes designate; everything else unchanged."""
    res = dict(parsed)
    budget = [hash_budget_bytes]
    for key, kind, tag in (("Lora hashes", "lora", "lora"), ("Hypernet hashes", "hypernetwork", "hypernet")):
        hashes = _hash_list(parsed.get(key))
        if hashes:
            def rename(match: re.Match, kind=kind, hashes=hashes) -> str:
                name = match.group(2)
                wanted = hashes.get(name.translate(_NAME_SEPARATORS))
                entry = _locate(registry, kind, name, wanted, budget) if wanted else None
                return match.group(1) + (entry.stem if entry is not None else name)

            pattern = re.compile(rf"(<{tag}:)([^:>]+)")
            for field in ("Prompt", "Negative prompt"):
                if isinstance(res.get(field), str):
                    res[field] = pattern.sub(rename, res[field])
    for name, wanted in _hash_list(parsed.get("TI hashes")).items():
        entry = _locate(registry, "embedding", name, wanted, budget)
        if entry is not None and entry.stem != name:
            word = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
            for field in ("Prompt", "Negative prompt"):
                if isinstance(res.get(field), str):
                    res[field] = word.sub(entry.stem, res[field])
    return res


def _hash_list(text: Any) -> dict[str, str]:
    """`name: hash, name2: hash2` -> {name: hash} (A1111's reading: split on `,`, then the first `:`)."""
    if not isinstance(text, str):
        return {}
    pairs = {}
    for item in text.split(","):
        name, sep, value = item.partition(":")
        if sep and name.strip() and value.strip():
            pairs[name.strip()] = value.strip().lower()
    return pairs


def find_by_hash(registry: ModelRegistry, kind: str, shorthash: str,
                 hash_budget_bytes: int = HASH_BUDGET_BYTES) -> ModelEntry | None:
    """The `kind` file whose hash starts with `shorthash`: known hashes first, then files whose
    hash is not known yet are hashed (cached from then on), up to `hash_budget_bytes`."""
    return _known_match(registry, kind, shorthash) or _computed_match(registry, kind, shorthash, [hash_budget_bytes])


def _locate(registry: ModelRegistry, kind: str, name: str, shorthash: str, budget: list[int]) -> ModelEntry | None:
    try:
        named = registry.find(kind, name)
    except ModelNotFoundError:
        named = None
    if named is not None and (_known_hash(registry, kind)(named) or "").startswith(shorthash):
        return named
    found = _known_match(registry, kind, shorthash)
    if found is not None:
        return found
    if named is not None:
        return named  # the file of that name now: a new version, or its hash was never computed
    return _computed_match(registry, kind, shorthash, budget)


def _known_match(registry: ModelRegistry, kind: str, shorthash: str) -> ModelEntry | None:
    known = _known_hash(registry, kind)
    return next((e for e in registry.entries(kind) if (known(e) or "").startswith(shorthash)), None)


def _computed_match(registry: ModelRegistry, kind: str, shorthash: str, budget: list[int]) -> ModelEntry | None:
    """Hash the files whose hash is not known yet, while `budget` (bytes, shared by one paste) lasts."""
    known = _known_hash(registry, kind)
    compute = registry.addnet_hash if kind == "lora" else registry.sha256
    for entry in registry.entries(kind):
        if known(entry) is None and entry.format != "diffusers" and entry.size <= budget[0]:
            budget[0] -= entry.size
            try:
                value = compute(entry)
            except (OSError, ValueError):
                continue
            if value.startswith(shorthash):
                return entry
    return None


def _known_hash(registry: ModelRegistry, kind: str) -> Callable[[ModelEntry], str | None]:
    def known(entry: ModelEntry) -> str | None:
        if kind == "lora":
            value = entry.metadata.get("sshs_model_hash") or registry.hashes.cached_addnet(
                entry.path, registry.hash_title(entry))
        else:
            value = registry.cached_sha256(entry)
        return value.lower() if value else None

    return known
