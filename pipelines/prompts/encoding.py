"""Token-weighted CLIP encoding the A1111 way, on the active diffusers pipeline's own
tokenizers and text encoders (so textual-inversion tokens loaded into them work by name).

A prompt is tokenized fragment by fragment (each with its emphasis weight), packed into 75-token
chunks (BREAK ends a chunk; a chunk that would split mid-phrase moves the text after the last
comma within `COMMA_BACKTRACK` tokens into the next chunk, else it is cut hard at 75; a
multi-vector textual-inversion embedding that does not fit moves whole into the next chunk),
each chunk is encoded as its own 77-token sequence, the hidden states are scaled by the weights
("Original" emphasis restores the chunk's mean afterwards), and the chunks are concatenated
along the sequence axis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipelines.prompts.parser import BREAK, BREAK_WEIGHT, parse_attention

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20  # A1111 "comma_padding_backtrack" default
EMPHASIS_MODES = ("Original", "No norm")
MAX_CLIP_SKIP = 12


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """One prompt's conditioning: `embeds` [1, 77*chunks, D]; `pooled` [1, P] for SDXL."""
    embeds: torch.Tensor
    pooled: torch.Tensor | None

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK_LENGTH + 2)


def _fragments(text: str, emphasis: bool = True) -> list[tuple[str, float]]:
    return parse_attention(text) if emphasis else [(text, 1.0)]


def tokenize_chunks(tokenizer, text: str, convert=None) -> tuple[list[Chunk], int]:
    """75-token chunks of weighted tokens, and the number of tokens the prompt uses.

    `convert(text, tokenizer)` expands textual-inversion names into their vector tokens
    (diffusers' `maybe_convert_prompt`)."""
    fragments = _fragments(text)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    embeddings = _multi_vector_embeddings(tokenizer)
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1
    token_count = 0

    def close(is_last: bool = False) -> None:
        nonlocal chunk, last_comma, token_count
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for fragment, weight in fragments:
        if fragment == BREAK and weight == BREAK_WEIGHT:
            close()
            continue
        if convert is not None:
            fragment = convert(fragment, tokenizer)
        tokens = tokenizer(fragment, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            vectors = _embedding_at(tokens, position, embeddings)
            if len(chunk.tokens) + len(vectors) > CHUNK_LENGTH:
                close()  # A1111: an embedding's vectors are never split across two chunks
            chunk.tokens.extend(vectors)
            chunk.weights.extend([weight] * len(vectors))
            position += len(vectors)
    if chunk.tokens or not chunks:
        close(is_last=True)
    return chunks, token_count


def _multi_vector_embeddings(tokenizer) -> dict[int, list[int]]:
    """{first token id: all its token ids} for each textual-inversion embedding of more than
    one vector: diffusers adds `name`, `name_1`, ... and `maybe_convert_prompt` writes them
    out in that order."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    groups = {}
    for name, first in added.items():
        ids = [first]
        while f"{name}_{len(ids)}" in added:
            ids.append(added[f"{name}_{len(ids)}"])
        if 1 < len(ids) <= CHUNK_LENGTH:
            groups[first] = ids
    return groups


def _embedding_at(tokens: list[int], position: int, embeddings: dict[int, list[int]]) -> list[int]:
    """The token ids to place together from `position`: a whole embedding, or one token."""
    vectors = embeddings.get(tokens[position])
    if vectors and tokens[position:position + len(vectors)] == vectors:
        return vectors
    return tokens[position:position + 1]


def count_tokens(tokenizer, text: str) -> tuple[int, int]:
    """(tokens used, chunk limit) for A1111's "23/75" counter."""
    _, count = tokenize_chunks(tokenizer, text)
    return count, max(CHUNK_LENGTH, math.ceil(count / CHUNK_LENGTH) * CHUNK_LENGTH)


def _chunk_ids(tokenizer, chunk: Chunk) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS + padding: diffusers' (and SDXL's training) layout; for SD1 the pad
    token is EOS, so this is also A1111's layout."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    filler = CHUNK_LENGTH - len(chunk.tokens)
    ids = [tokenizer.bos_token_id] + chunk.tokens + [tokenizer.eos_token_id] + [pad] * filler
    weights = [1.0] + chunk.weights + [1.0] * (filler + 1)
    return ids, weights


@dataclass(frozen=True)
class EncoderStack:
    """The pipeline's (tokenizer, text encoder) pairs. `sdxl`: the SDXL family (penultimate
    layer, pooled output of the last encoder): CLIP-L + OpenCLIP-G for a base model, OpenCLIP-G
    alone for the refiner."""
    tokenizers: tuple
    text_encoders: tuple
    convert: object = None  # pipe.maybe_convert_prompt when the pipe has it
    force_zeros_for_empty_negative: bool = False
    sdxl: bool = False

    @property
    def has_clip_l(self) -> bool:
        """SDXL's first encoder is CLIP-L only when there are two (the refiner has just CLIP-G)."""
        return self.sdxl and len(self.text_encoders) == 2

    @classmethod
    def from_pipe(cls, pipe) -> "EncoderStack":
        pairs = [(getattr(pipe, t, None), getattr(pipe, e, None))
                 for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
        pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
        if not pairs:
            raise ValueError("this pipeline has no text encoder: prompts cannot be encoded")
        config = getattr(pipe, "config", {}) or {}
        # SDXL family = it has the OpenCLIP-G pair (a refiner has no CLIP-L pair at all)
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        return cls(tokenizers=tuple(t for t, _ in pairs), text_encoders=tuple(e for _, e in pairs),
                   convert=getattr(pipe, "maybe_convert_prompt", None),
                   force_zeros_for_empty_negative=sdxl and bool(config.get("force_zeros_for_empty_prompt", False)),
                   sdxl=sdxl)


def _check(clip_skip: int, emphasis: str) -> None:
    if not isinstance(clip_skip, int) or not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise ValueError(f"clip skip must be a whole number from 1 to {MAX_CLIP_SKIP}, got {clip_skip}")
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got '{emphasis}'")


@torch.no_grad()
def encode_prompt(stack: EncoderStack, text: str, clip_skip: int = 1, emphasis: str = "Original",
                  sdxl_clip_l_skip: bool = False) -> Encoded:
    """Encode one prompt (no editing/AND syntax left in it) into chunked, weighted embeddings.

    SDXL follows A1111: clip skip is ignored (both encoders give their penultimate layer)
    unless `sdxl_clip_l_skip` (A1111's "Clip skip SDXL" option), which applies it to CLIP-L
    only, as hidden state N from the end without the final norm; CLIP-G stays penultimate."""
    return encode_prompts(stack, [text], clip_skip, emphasis, sdxl_clip_l_skip)[0]


@torch.no_grad()
def encode_prompts(stack: EncoderStack, texts: list[str], clip_skip: int = 1, emphasis: str = "Original",
                   sdxl_clip_l_skip: bool = False) -> list[Encoded]:
    """Encode the texts of one prompt's editing schedule together, as A1111 does: all get the
    chunk count of the longest (empty chunks appended), and "Original" emphasis restores the
    mean of each chunk position over all of them at once, so one text's weights scale the
    others too. `encode_prompt` is the one-text case."""
    _check(clip_skip, emphasis)
    per_encoder = [[tokenize_chunks(tok, text, stack.convert)[0] for text in texts] for tok in stack.tokenizers]
    chunk_count = max(len(c) for chunks_of_texts in per_encoder for c in chunks_of_texts)
    hidden, pooled = [], None
    for index, (tokenizer, encoder, chunks_of_texts) in enumerate(zip(stack.tokenizers, stack.text_encoders,
                                                                       per_encoder)):
        # TI vectors can differ per encoder, and texts differ in length: pad all to one count
        rows = [_chunk_ids(tokenizer, c) for chunks in chunks_of_texts
                for c in chunks + [Chunk()] * (chunk_count - len(chunks))]
        ids = torch.tensor([r[0] for r in rows], device=encoder.device)
        weights = torch.tensor([r[1] for r in rows], device=encoder.device)
        output = encoder(ids, output_hidden_states=True)
        z = _select_layer(encoder, output, clip_skip, stack.sdxl,
                          clip_l=index == 0 and stack.has_clip_l and sdxl_clip_l_skip)
        if stack.sdxl and index == len(stack.text_encoders) - 1:  # OpenCLIP-G gives the pooled vector
            pooled = output[0][::chunk_count]  # A1111: the pooled vector of each text's first chunk
        z = z.reshape(len(texts), chunk_count, *z.shape[1:])
        hidden.append(_apply_weights(z, weights.reshape(z.shape[:3]), emphasis))
    z = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
    dtype = stack.text_encoders[0].dtype
    return [Encoded(embeds=z[k].reshape(1, -1, z.shape[-1]).to(dtype),
                    pooled=pooled[k:k + 1].to(dtype) if pooled is not None else None) for k in range(len(texts))]


def _select_layer(encoder, output, clip_skip: int, sdxl: bool, clip_l: bool = False) -> torch.Tensor:
    if sdxl:  # SDXL conditions on the penultimate layer without the final norm
        states = output.hidden_states
        # A1111 sd_hijack_clip (SDXL CLIP-L with sdxl_clip_l_skip): hidden_states[-N], so N=2 is
        # the default layer and N=1 the last layer, still without the final norm
        return states[max(-clip_skip, -len(states))] if clip_l else states[-2]
    if clip_skip == 1:
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    states = output.hidden_states
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x still nests it
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_norm(states[max(-clip_skip, -len(states))])


def _apply_weights(z: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """z [texts, chunks, 77, D], weights [texts, chunks, 77]. "Original": each chunk position's
    mean over all texts is restored after weighting (A1111's z.mean() over one chunk batch)."""
    if bool((weights == 1.0).all()):
        return z  # nothing to weight: bit-identical to the unweighted encoding
    weights = weights.to(z.dtype)
    if emphasis == "No norm":
        return z * weights[..., None]
    dims = (0, 2, 3) if z.shape[0] > 1 else (2, 3)
    original = z.float().mean(dim=dims, keepdim=True)
    weighted = z * weights[..., None]
    restored = weighted.float() * (original / weighted.float().mean(dim=dims, keepdim=True))
    return restored.to(z.dtype)
