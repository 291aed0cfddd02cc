"""Textual-inversion embeddings, loaded by name for the requests whose prompts use them.

Files (A1111 `embeddings/`): A1111 `.pt` (`string_to_param`, read with `weights_only=True`) and
`.safetensors` (`emb_params`), diffusers `.bin` / `.safetensors` (one `token: vectors` entry) and
SDXL pairs (`clip_l` + `clip_g`). The word is the file stem.

Scoping: the request's pipeline gets a copy of each tokenizer and diffusers'
`load_textual_inversion(..., token=name)` adds the vectors to it and to the text encoder; when the
request ends the text encoder gets its original embedding table back (patch with backup) and the
pipeline its original tokenizer, so the shared checkpoint is bit-for-bit what it was.
"""
from __future__ import annotations

import copy
import logging
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from pipelines.registry import ModelEntry, ModelRegistry

log = logging.getLogger(__name__)

# (tokenizer attribute, text encoder attribute, key of this encoder's vectors in SDXL files)
_ENCODERS = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """Vectors of an embedding file: {"clip_l": t, "clip_g": t} for SDXL, {"*": t} otherwise,
    each shaped (n_vectors, width)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path), device="cpu")
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"embedding {path.name} needs full unpickling (unsafe); use a .safetensors copy") from exc
    if isinstance(data, torch.Tensor):
        return {"*": _as_matrix(data)}
    if not isinstance(data, dict):
        raise ValueError(f"embedding {path.name} holds no vectors")
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": _as_matrix(data["clip_l"]), "clip_g": _as_matrix(data["clip_g"])}
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        return {"*": _as_matrix(next(iter(data["string_to_param"].values())))}
    if "emb_params" in data:
        return {"*": _as_matrix(data["emb_params"])}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return {"*": _as_matrix(tensors[0])}
    raise ValueError(f"embedding {path.name}: unknown layout (keys {sorted(data)[:5]})")


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().float()
    return tensor.reshape(1, -1) if tensor.ndim == 1 else tensor.reshape(-1, tensor.shape[-1])


def used_embeddings(registry: ModelRegistry, texts: Iterable[str]) -> list[ModelEntry]:
    """Embeddings whose name appears as a word in any of the texts, in registry order."""
    joined = "\n".join(t for t in texts if t)
    if not joined:
        return []
    found = []
    for entry in registry.embeddings():
        if re.search(rf"(?<![\w-]){re.escape(entry.stem)}(?![\w-])", joined):
            found.append(entry)
    return found


@contextmanager
def scoped_embeddings(pipe, entries: list[ModelEntry],
                      read=read_embedding) -> Iterator[list[ModelEntry]]:
    """Load `entries` into `pipe` for the block; yields the ones that fit this checkpoint."""
    if not entries:
        yield []
        return
    encoders = [(tok, te, key) for tok, te, key in _ENCODERS
                if getattr(pipe, tok, None) is not None and getattr(pipe, te, None) is not None]
    backups = []
    try:
        for tok_attr, te_attr, _ in encoders:
            text_encoder = getattr(pipe, te_attr)
            table = text_encoder.get_input_embeddings()
            # transformers resizes the table in place: keep the module, its Parameter and the data
            backups.append((tok_attr, getattr(pipe, tok_attr), text_encoder, table, table.weight,
                            table.weight.data, table.num_embeddings, text_encoder.config.vocab_size))
            setattr(pipe, tok_attr, copy.deepcopy(getattr(pipe, tok_attr)))  # the shared one stays as is
        loaded = [entry for entry in entries if _load_one(pipe, entry, encoders, read)]
        yield loaded
    finally:
        for tok_attr, tokenizer, text_encoder, table, weight, data, rows, vocab_size in reversed(backups):
            weight.data = data
            table.weight = weight
            table.num_embeddings = rows
            text_encoder.set_input_embeddings(table)
            text_encoder.config.vocab_size = vocab_size
            setattr(pipe, tok_attr, tokenizer)


def _load_one(pipe, entry: ModelEntry, encoders, read) -> bool:
    try:
        vectors = read(entry.path)
    except (ValueError, OSError, RuntimeError) as exc:
        log.warning("embedding %s skipped: %s", entry.name, exc)
        return False
    targets = []
    for tok_attr, te_attr, key in encoders:
        tensor = vectors.get(key) if len(encoders) > 1 else vectors.get("*")  # SDXL pairs: SDXL only
        width = getattr(pipe, te_attr).get_input_embeddings().weight.shape[-1]
        if tensor is None or tensor.shape[-1] != width:
            # A1111 behaviour: an embedding for another model is not applied; the word stays text.
            log.info("embedding %s does not fit this checkpoint's text encoder %s", entry.name, te_attr)
            return False
        tokenizer = getattr(pipe, tok_attr)
        if entry.stem in tokenizer.get_vocab():
            log.info("embedding %s skipped: its name is already a word of the tokenizer", entry.name)
            return False
        targets.append((tokenizer, getattr(pipe, te_attr), tensor))
    for tokenizer, text_encoder, tensor in targets:
        pipe.load_textual_inversion(tensor, token=entry.stem, tokenizer=tokenizer, text_encoder=text_encoder)
    return True


def ti_hashes(registry: ModelRegistry, entries: Iterable[ModelEntry]) -> str | None:
    """`name: sha256[:12], ...` for the `TI hashes` infotext key."""
    parts = [f"{e.stem.translate(str.maketrans('', '', ':,'))}: {registry.sha256(e)[:12]}" for e in entries]
    return ", ".join(parts) or None
