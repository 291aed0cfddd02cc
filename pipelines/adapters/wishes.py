"""What adapters a request asks for, read from the extra-network tags of its prompts
(`<lora:name:w>`, `<lora:name:te:unet>`, `<hypernet:name:w>`), and what the infotext says
about the ones that were applied (A1111 `Lora hashes`; `Hypernet hashes`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pipelines.adapters.lora_stack import AppliedLora, LoraRequest
from pipelines.prompts.extra_networks import extract_extra_networks
from pipelines.registry import ModelRegistry

# A1111 drops these from names inside quoted `name: hash` lists.
_NAME_SEPARATORS = str.maketrans("", "", ":,")


@dataclass(frozen=True)
class HypernetRequest:
    name: str
    strength: float = 1.0


@dataclass(frozen=True)
class AdapterWishes:
    loras: tuple[LoraRequest, ...] = ()
    hypernets: tuple[HypernetRequest, ...] = ()
    texts: tuple[str, ...] = ()  # the prompts they were read from (embeddings are found in these)


def adapter_wishes(*prompts: str) -> AdapterWishes:
    """Tags from all prompts (positive and negative), in order of appearance. A network named in
    several prompts (the same prompt per image of a batch) counts once, as its first mention; a
    LoRA named twice in one prompt adds up (the stack sums them), a hypernetwork applies once."""
    loras: list[LoraRequest] = []
    hypernets: list[HypernetRequest] = []
    for text in prompts:
        seen_before = {w.name for w in loras}
        for tag in extract_extra_networks(text or "")[1]:
            if tag.kind == "lora" and tag.name not in seen_before:
                te, unet = tag.lora_weights()
                loras.append(LoraRequest(tag.name, te, unet))
            elif tag.kind == "hypernet" and tag.name not in {w.name for w in hypernets}:
                hypernets.append(HypernetRequest(tag.name, tag.multiplier(0, 1.0)))
    return AdapterWishes(tuple(loras), tuple(hypernets), tuple(t or "" for t in prompts))


def lora_hashes(registry: ModelRegistry, applied: Iterable[AppliedLora], mentioned: Iterable[LoraRequest]) -> str | None:
    """`name: hash12, ...` for the `Lora hashes` infotext key, names as the prompt wrote them.
    kohya's own `sshs_model_hash` is used when the file has one (A1111 does the same)."""
    by_stem = {a.entry.stem: a for a in applied}
    parts, seen = [], set()
    for request in mentioned:
        entry = registry.find("lora", request.name)
        if entry.stem not in by_stem or entry.stem in seen:
            continue
        seen.add(entry.stem)
        shorthash = (entry.metadata.get("sshs_model_hash") or registry.addnet_hash(entry))[:12]
        parts.append(f"{request.name.translate(_NAME_SEPARATORS)}: {shorthash}")
    return ", ".join(parts) or None


def hypernet_hashes(registry: ModelRegistry, wishes: Iterable[HypernetRequest]) -> str | None:
    """`name: shorthash, ...` (AutoV2, 10 hex) for the `Hypernet hashes` infotext key."""
    parts = [f"{w.name.translate(_NAME_SEPARATORS)}: {registry.shorthash(registry.find('hypernetwork', w.name))}"
             for w in wishes]
    return ", ".join(parts) or None
