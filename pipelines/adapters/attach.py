"""The adapters lane's one call site in generate(): read the wishes from the prompts, and around
sampling apply what is scoped to the request; report what was applied for the infotext.

LoRAs are selected by the manager (`pipeline(..., loras=...)`): they stay resident between
requests. Everything entered here is undone when the block ends, also on errors and interrupts.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from pipelines.adapters import embeddings
from pipelines.adapters.wishes import AdapterWishes, adapter_wishes, lora_hashes
from pipelines.prompts.extra_networks import extract_extra_networks


def wishes_for(request) -> AdapterWishes:
    return adapter_wishes(request.prompt, request.negative_prompt)


@contextmanager
def attach(manager, active, request, wishes: AdapterWishes) -> Iterator[dict[str, Any]]:
    """Yields the infotext parameters of the adapters in use."""
    registry = manager.registry
    params: dict[str, Any] = {}
    hashes = lora_hashes(registry, active.loras, wishes.loras)
    if hashes:
        params["Lora hashes"] = hashes
    texts = [extract_extra_networks(t or "")[0] for t in (request.prompt, request.negative_prompt)]
    with embeddings.scoped_embeddings(active.pipe, embeddings.used_embeddings(registry, texts)) as used:
        ti = embeddings.ti_hashes(registry, used)
        if ti:
            params["TI hashes"] = ti
        yield params
