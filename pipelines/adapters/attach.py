"""The adapters lane's one call site in generate(): read the wishes from the prompts, and around
sampling apply what is scoped to the request; report what was applied for the infotext.

LoRAs are selected by the manager (`pipeline(..., loras=...)`): they stay resident between
requests. Everything entered here is undone when the block ends, also on errors and interrupts.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from pipelines.adapters.wishes import AdapterWishes, adapter_wishes, lora_hashes


def wishes_for(request) -> AdapterWishes:
    return adapter_wishes(request.prompt, request.negative_prompt)


@contextmanager
def attach(manager, active, request, wishes: AdapterWishes) -> Iterator[dict[str, Any]]:
    """Yields the infotext parameters of the adapters in use."""
    params: dict[str, Any] = {}
    hashes = lora_hashes(manager.registry, active.loras, wishes.loras)
    if hashes:
        params["Lora hashes"] = hashes
    yield params
