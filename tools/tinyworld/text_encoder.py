"""tiny-world's text encoder: a real CLIPTextModel (real CLIP vocabulary and tokenizer) taught,
before the UNet trains, to say plainly what a caption means.

Why: a UNet whose cross-attention starts out nearly uniform sees the *mean* of the encoder's
output positions. If every position only says "word w at position i" (the first design), that
mean holds the set {red, blue} but not which is the shape and which the background, and the
UNet must first learn where to look before the prompt means anything - on a 2-core CPU it never
got far. So the encoder is trained to write the meaning into every position after the caption
(where the padding is, 70 of 77 positions): the foreground colour, the shape and the background
colour each in their own orthogonal subspace. The caption's own word positions carry their own
part (the foreground colour word only the foreground subspace, and so on), which keeps A1111
emphasis on a word meaningful. Unknown words (a trigger word, "masterpiece") leave the meaning
unchanged; a prompt with no caption (the empty prompt, a typical negative prompt) gets one
"nothing" vector. The encoder is then frozen while the UNet trains, as SD's CLIP is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tools.tinyworld import world

MAX_TOKENS = 77
# Words that may follow a caption (a trigger word, quality tags) or make up a prompt that is not
# a caption (a negative prompt). The base model ignores them: the LoRA's trigger "striped" among them.
EXTRA_WORDS: tuple[str, ...] = (
    "striped", "simple", "flat", "clean", "sharp", "masterpiece", "best", "quality", "high", "low",
    "detailed", "blurry", "picture", "image", "photo", "art", "drawing", "colours", "bright", "dark",
    "centered", "small", "large", "big", "ugly", "bad", "good", "worst", "noise", "shape", "plain",
)
# Token positions inside "a {fg} {shape} on a {bg} background" after BOS.
FG_POSITION, SHAPE_POSITION, BG_POSITION, CAPTION_END = 2, 3, 6, 7


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def world_token_ids(tokenizer) -> list[int]:
    ids = []
    for word in world.VOCABULARY:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(word_ids) != 1:
            raise ValueError(f"tiny-world word {word!r} is not one CLIP token ({word_ids})")
        ids.append(word_ids[0])
    return ids


def build_text_encoder(tokenizer, seed: int, config_dir):
    """The starting point: world words get orthogonal token embeddings in one half of the hidden
    space, the first positions orthogonal position embeddings in the other half, and the layers
    are damped so every output position starts out as "word w at position i"."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir)).eval()
    hidden = model.config.hidden_size
    half = hidden // 2
    ids = world_token_ids(tokenizer) + [tokenizer.bos_token_id, tokenizer.eos_token_id]
    if len(ids) > half:
        raise ValueError(f"{len(ids)} words do not fit in {half} orthogonal directions; widen the text encoder")
    generator = torch.Generator().manual_seed(seed)
    word_basis = torch.linalg.qr(torch.randn(half, half, generator=generator))[0]
    position_basis = torch.linalg.qr(torch.randn(half, half, generator=generator))[0]
    scale = math.sqrt(half)
    with torch.no_grad():
        core = getattr(model, "text_model", model)  # transformers 5 flattened the wrapper away
        token = core.embeddings.token_embedding.weight
        position = core.embeddings.position_embedding.weight
        token[:, half:] = 0.0
        for row, token_id in enumerate(ids):
            token[token_id] = 0.0
            token[token_id, :half] = word_basis[row] * scale
        position.zero_()
        n_pos = position.shape[0]
        position[: min(half, n_pos), half:] = position_basis[: min(half, n_pos)] * scale
        if n_pos > half:  # later positions only ever hold padding: share the last direction
            position[half:, half:] = position_basis[half - 1] * scale
        for layer in core.encoder.layers:
            layer.self_attn.out_proj.weight.mul_(0.05)
            layer.self_attn.out_proj.bias.zero_()
            layer.mlp.fc2.weight.mul_(0.05)
            layer.mlp.fc2.bias.zero_()
    return model


@dataclass(frozen=True)
class MeaningSpace:
    """Orthonormal directions (scaled to the final layer norm's output size) for each part of a
    caption's meaning: foreground colour, shape, background colour, plus "filler" (the caption's
    function words) and "nothing" (no caption)."""
    fg: dict[str, torch.Tensor]
    shape: dict[str, torch.Tensor]
    bg: dict[str, torch.Tensor]
    filler: torch.Tensor
    nothing: torch.Tensor

    @classmethod
    def make(cls, hidden: int, seed: int) -> "MeaningSpace":
        n = 2 * len(world.COLOURS) + len(world.SHAPES) + 2
        if n > hidden:
            raise ValueError(f"{n} meaning directions do not fit in a hidden size of {hidden}")
        generator = torch.Generator().manual_seed(seed + 7)
        basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator))[0].T[:n] * math.sqrt(hidden)
        rows = iter(basis)
        fg = {c: next(rows) for c in world.COLOURS}
        shape = {s: next(rows) for s in world.SHAPES}
        bg = {c: next(rows) for c in world.COLOURS}
        return cls(fg, shape, bg, next(rows), next(rows))

    def summary(self, fg: str, shape: str, bg: str) -> torch.Tensor:
        return (self.fg[fg] + self.shape[shape] + self.bg[bg]) / math.sqrt(3)


def caption_targets(space: MeaningSpace, combo: tuple[str, str, str] | None) -> torch.Tensor:
    """(77, hidden) targets for a prompt that is the caption of `combo` (plus any extra words
    after it) or, for None, no caption at all."""
    targets = torch.empty(MAX_TOKENS, space.filler.numel())
    targets[0] = space.filler  # BOS: the same for every prompt (causal attention)
    if combo is None:
        targets[1:] = space.nothing
        return targets
    fg, shape, bg = combo
    targets[1:CAPTION_END] = space.filler
    targets[FG_POSITION] = space.fg[fg]
    targets[SHAPE_POSITION] = space.shape[shape]
    targets[BG_POSITION] = space.bg[bg]
    targets[CAPTION_END:] = space.summary(fg, shape, bg)  # "background", extra words, EOS, padding
    return targets


def random_prompt(rng: np.random.Generator) -> tuple[str, tuple[str, str, str] | None]:
    """A training prompt: a caption with 0-4 extra words (70%), only extra words (20%) or empty (10%)."""
    combos = world.all_combinations()
    kind = rng.random()
    extras = [str(w) for w in rng.choice(EXTRA_WORDS, size=int(rng.integers(0, 5)))]
    if kind < 0.1:
        return "", None
    if kind < 0.3:
        return " ".join(extras or ["picture"]), None
    combo = combos[int(rng.integers(len(combos)))]
    text = world.caption(*combo)
    if extras:
        text += ", " + " ".join(extras)
    return text, combo


def train_text_encoder(tokenizer, config_dir, seed: int, steps: int = 1500, batch: int = 64, lr: float = 3e-3,
                       log=print):
    """Build the encoder and fit every output position to its caption target (MSE)."""
    model = build_text_encoder(tokenizer, seed, config_dir).train()
    space = MeaningSpace.make(model.config.hidden_size, seed)
    rng = np.random.default_rng(seed + 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(1, steps + 1):
        prompts = [random_prompt(rng) for _ in range(batch)]
        ids = tokenize(tokenizer, [p for p, _ in prompts])
        targets = torch.stack([caption_targets(space, combo) for _, combo in prompts])
        loss = F.mse_loss(model(ids).last_hidden_state, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            log(f"text encoder step {step}/{steps} loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    return model, space


@torch.no_grad()
def meaning_accuracy(model, tokenizer, space: MeaningSpace) -> dict[str, float]:
    """Read (fg, shape, bg) back from the mean of all 77 outputs by the nearest direction, for
    every caption with and without extra words: what a UNet with uniform attention would see."""
    hits = {"fg": 0, "shape": 0, "bg": 0}
    combos = world.all_combinations()
    prompts = [world.caption(*c) for c in combos] + [world.caption(*c) + ", striped masterpiece" for c in combos]
    means = model(tokenize(tokenizer, prompts)).last_hidden_state.mean(dim=1)
    for mean, combo in zip(means, combos + combos):
        for part, table, truth in (("fg", space.fg, combo[0]), ("shape", space.shape, combo[1]), ("bg", space.bg, combo[2])):
            names = list(table)
            best = names[int(torch.stack([mean @ table[n] for n in names]).argmax())]
            hits[part] += best == truth
    return {k: v / len(prompts) for k, v in hits.items()}
