"""The adapters lane's one call site in generate(): read the wishes from the prompts, and around
sampling apply what is scoped to the request; report what was applied for the infotext.

LoRAs are selected by the manager (`pipeline(..., loras=...)`): they stay resident between
requests. Embeddings and hypernetworks entered here are undone when the block ends, also on
errors and interrupts.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from pipelines.adapters import embeddings, hypernetworks
from pipelines.adapters.wishes import AdapterWishes, adapter_wishes, hypernet_hashes, lora_hashes
from pipelines.cache import module_bytes
from pipelines.prompts.extra_networks import extract_extra_networks


def wishes_for(request, image_prompts=()) -> AdapterWishes:
    """From the request's prompts (styles applied) and each image's prompts (wildcards filled)."""
    texts = [request.prompt, request.negative_prompt]
    for image_prompt in image_prompts:
        texts += [image_prompt.prompt, image_prompt.negative_prompt]
    return adapter_wishes(*dict.fromkeys(texts))  # each distinct text once


@contextmanager
def attach(manager, active, request, wishes: AdapterWishes) -> Iterator[dict[str, Any]]:
    """Yields the infotext parameters of the adapters in use."""
    registry = manager.registry
    params: dict[str, Any] = {}
    hashes = lora_hashes(registry, active.loras, wishes.loras)
    if hashes:
        params["Lora hashes"] = hashes
    networks = [(_hypernetwork(manager, wish.name), wish.strength) for wish in wishes.hypernets]
    if networks:
        # The `<hypernet:...>` tags stay in the prompt, which is what A1111 1.x keeps too. No
        # legacy `Hypernet` key: A1111's paste appends a tag for it, applying the network twice.
        params["Hypernet hashes"] = hypernet_hashes(registry, wishes.hypernets)
    texts = [extract_extra_networks(t or "")[0] for t in wishes.texts]
    with embeddings.scoped_embeddings(active.pipe, embeddings.used_embeddings(registry, texts)) as used, \
            hypernetworks.scoped_hypernetworks(active.pipe.unet, networks):
        ti = embeddings.ti_hashes(registry, used)
        if ti:
            params["TI hashes"] = ti
        yield params


def warnings_of(active) -> list[str]:
    """What the user should know about the adapters of this request (shown next to the images)."""
    return [lora.report for lora in active.loras if lora.report]


def _hypernetwork(manager, name: str) -> hypernetworks.Hypernetwork:
    """Through the manager's RAM cache: loaded from disk once while it stays in budget."""
    entry = manager.registry.find("hypernetwork", name)

    def load():
        manager.load_counts["hypernetwork"] += 1
        return hypernetworks.load_hypernetwork(entry.path, entry.stem)

    key = ("hypernetwork", str(entry.path), entry.mtime, entry.size)
    return manager.cache.get_or_load(key, load, size_of=lambda h: sum(
        module_bytes(m) for pair in h.layers.values() for m in pair))
