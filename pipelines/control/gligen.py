"""GLIGEN grounding (phrases placed in boxes), as ComfyUI loads it: a separate file of the
position net and the gated self-attention layers ("fusers"), grafted onto the active UNet for
one generation and removed after (patch with backup: the UNet has no fuser before or after).

Files live in models/gligen (ComfyUI's folder): keys `position_net.*` and `<block>.fuser.*`
with LDM block names (`input_blocks.1.1.transformer_blocks.0.fuser...`, optionally prefixed
`model.diffusion_model.`) or diffusers names (`down_blocks.0.attentions.0.transformer_blocks.0.fuser...`).
The boxes reach the UNet through the pipeline's `cross_attention_kwargs["gligen"]`, which
diffusers' UNet turns into object tokens (its position net) and every transformer block feeds
to its fuser, so the ordinary txt2img / img2img / inpaint pipelines and their callbacks run it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from pipelines.control.units import GLIGEN_MAX_BOXES
from pipelines.loading import ModelLoadError

GLIGEN_FOLDER = "gligen"
_LDM_PREFIX = "model.diffusion_model."


def gligen_files(models_dir: Path) -> list[str]:
    folder = models_dir / GLIGEN_FOLDER
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.safetensors"))] if folder.is_dir() else []


def find_gligen(models_dir: Path, name: str) -> Path:
    folder = models_dir / GLIGEN_FOLDER
    for rel in gligen_files(models_dir):
        if name in (rel, rel.rsplit(".", 1)[0], Path(rel).stem):
            return folder / rel
    raise ValueError(f"GLIGEN model '{name}' not found: put it in {folder} "
                     f"(found: {', '.join(gligen_files(models_dir)) or 'none'})")


def read_gligen(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(path))
    state = {k[len(_LDM_PREFIX):] if k.startswith(_LDM_PREFIX) else k: v for k, v in state.items()}
    if not any(k.startswith("position_net.") for k in state) or not any(".fuser." in k for k in state):
        raise ModelLoadError(f"{path.name} is not a GLIGEN model (no position_net.* and fuser weights)")
    return state


def _transformer_blocks(unet) -> dict[str, Any]:
    from diffusers.models.attention import BasicTransformerBlock

    return {name: module for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)}


def _ldm_block_names(unet, names: Sequence[str]) -> dict[str, str]:
    """diffusers transformer block name -> its LDM name, through our UNet key converter."""
    from pipelines.ldm_convert import unet_to_ldm

    suffix = ".attn1.to_q.weight"
    config = dict(unet.config)
    return {name: next(iter(unet_to_ldm({name + suffix: torch.empty(0)}, config)))[: -len(suffix)] for name in names}


@contextmanager
def grafted(unet, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[None]:
    """The position net and fusers on `unet` for the duration of the block, then removed."""
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    blocks = _transformer_blocks(unet)
    ldm_names = _ldm_block_names(unet, list(blocks))
    fusers = {}
    for name, block in blocks.items():
        prefix = next((p for p in (f"{name}.fuser.", f"{ldm_names.get(name)}.fuser.")
                       if f"{p}linear.weight" in state), None)
        if prefix is None:
            raise ModelLoadError(f"the GLIGEN model has no fuser for {name}: it is made for another base model")
        dim, heads = block.attn1.query_dim, block.attn1.heads
        fuser = GatedSelfAttentionDense(dim, state[f"{prefix}linear.weight"].shape[1], heads, dim // heads)
        fuser.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        fusers[name] = fuser.to(device=unet.device, dtype=dtype).eval()
    first = state["position_net.linears.0.weight"]
    position = GLIGENTextBoundingboxProjection(positive_len=first.shape[1] - 64,
                                               out_dim=state["position_net.linears.4.weight"].shape[0])
    position.load_state_dict({k[len("position_net."):]: v for k, v in state.items() if k.startswith("position_net.")})
    position = position.to(device=unet.device, dtype=dtype).eval()
    if any(hasattr(b, "fuser") for b in blocks.values()) or hasattr(unet, "position_net"):
        raise ValueError("this checkpoint already has GLIGEN layers; pick a plain checkpoint")
    try:
        unet.position_net = position
        for name, fuser in fusers.items():
            blocks[name].fuser = fuser
        yield
    finally:
        for block in blocks.values():
            if "fuser" in block._modules:
                del block.fuser
        if "position_net" in unet._modules:
            del unet.position_net


@torch.no_grad()
def cross_attention_kwargs(pipe, boxes: Sequence[tuple], batch: int, cfg: bool) -> dict[str, Any]:
    """`{"gligen": {boxes, positive_embeddings, masks}}` for a batch (doubled for CFG, with the
    unconditional half masked out, as diffusers' GLIGEN pipeline does)."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    phrases = [b[0] for b in boxes]
    tokens = tokenizer(phrases, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    embeds = encoder(tokens.input_ids.to(encoder.device)).pooler_output
    count, device, dtype = len(boxes), encoder.device, pipe.unet.dtype
    coords = torch.zeros(GLIGEN_MAX_BOXES, 4, device=device, dtype=dtype)
    coords[:count] = torch.tensor([list(b[1:]) for b in boxes], dtype=dtype)
    positive = torch.zeros(GLIGEN_MAX_BOXES, embeds.shape[-1], device=device, dtype=dtype)
    positive[:count] = embeds.to(dtype)
    masks = torch.zeros(GLIGEN_MAX_BOXES, device=device, dtype=dtype)
    masks[:count] = 1
    coords, positive, masks = (t.unsqueeze(0).expand(batch, *t.shape).clone() for t in (coords, positive, masks))
    if cfg:
        coords, positive, masks = torch.cat([coords] * 2), torch.cat([positive] * 2), torch.cat([masks] * 2)
        masks[:batch] = 0
    return {"gligen": {"boxes": coords, "positive_embeddings": positive, "masks": masks}}


def boxes_from_strokes(strokes, phrases: Sequence[str], min_side: int = 3) -> tuple[tuple, ...]:
    """Drawn GLIGEN boxes: every separate stroke group of `strokes` (H x W, true where drawn)
    becomes the box around it, as (phrase, x0, y0, x1, y1) fractions of the canvas. Groups are
    taken in reading order (top edge, then left edge) and get `phrases` in that order; specks
    narrower or lower than `min_side` pixels are ignored."""
    import cv2
    import numpy as np

    mask = np.asarray(strokes).astype(bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("draw at least one box on the GLIGEN canvas first")
    height, width = mask.shape
    # A hand-drawn outline has small gaps: close them so one drawn box is one group.
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    found = []
    for label in range(1, count):
        ys, xs = np.nonzero(mask & (labels == label))  # the drawn pixels, without the dilation
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        if x1 - x0 >= min_side and y1 - y0 >= min_side:
            found.append((y0, x0, x1, y1))
    found.sort()
    names = [p.strip() for p in phrases if p and p.strip()]
    if len(names) != len(found):
        raise ValueError(f"{len(found)} box(es) drawn but {len(names)} phrase(s) given: write one phrase per "
                         "line for each drawn box, in reading order (top to bottom, then left to right)")
    return tuple((name, round(x0 / width, 3), round(y0 / height, 3), round(x1 / width, 3), round(y1 / height, 3))
                 for name, (y0, x0, x1, y1) in zip(names, found))
