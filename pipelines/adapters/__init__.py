"""Adapters applied on top of a loaded checkpoint: LoRA (kept resident, selected per request),
textual-inversion embeddings and hypernetworks (scoped to one request)."""
