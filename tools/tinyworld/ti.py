"""`--stage ti`: a two-vector textual-inversion embedding meaning "green square", A1111 format.

Only two new token embeddings are optimised (UNet, VAE and the rest of the text encoder stay
frozen), on the training images that show a green square, captioned
`a <v0> <v1> on a {bg} background`. The vectors start from the words "green" and "square"
(A1111's "initialization text"). Saved as A1111 writes embeddings:
- `.pt`: {'string_to_token': {'*': 265}, 'string_to_param': {'*': tensor[2, 64]}, 'name', 'step',
  'sd_checkpoint', 'sd_checkpoint_name'} - only tensors, strings and ints, so it loads with
  `torch.load(..., weights_only=True)`;
- `.safetensors`: {'emb_params': tensor[2, 64]}.
In a prompt the embedding is used by its file name: `a tw-green-square on a red background`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tools.tinyworld.finetune import load_base_pipeline, load_latents
from tools.tinyworld.objective import DiffusionLoss
from tools.tinyworld.train import log, tokenize

EMBEDDING_NAME = "tw-green-square"
CONCEPT = ("green", "square")
INIT_WORDS = ("green", "square")
PLACEHOLDERS = ("<tw-gs-0>", "<tw-gs-1>")


def concept_prompt(bg: str, token: str = EMBEDDING_NAME) -> str:
    return f"a {token} on a {bg} background"


def stage_ti(run_dir: Path, base: Path, output_dir: Path, seed: int, steps: int, batch: int, lr: float, minutes: float) -> None:
    torch.manual_seed(seed)
    pipe = load_base_pipeline(base)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    init_ids = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in INIT_WORDS]
    tokenizer.add_tokens(list(PLACEHOLDERS))
    new_ids = tokenizer.convert_tokens_to_ids(list(PLACEHOLDERS))
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[new_ids] = table[init_ids].clone()
    original = table.detach().clone()
    table.requires_grad_(True)
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[new_ids] = False

    latents = load_latents(run_dir)
    picks = [i for i, (fg, shape, _) in enumerate(latents.combos) if (fg, shape) == CONCEPT]
    placeholder = " ".join(PLACEHOLDERS)
    prompt_ids = tokenize(tokenizer, [concept_prompt(latents.combos[i][2], placeholder) for i in picks])
    picks = torch.tensor(picks)
    log(run_dir, f"ti: {len(picks)} green-square images")

    optimizer = torch.optim.AdamW([table], lr=lr, weight_decay=0.0)
    loss_fn = DiffusionLoss()
    generator = torch.Generator().manual_seed(seed + 3)
    scale = vae.config.scaling_factor
    deadline = time.time() + minutes * 60
    step = 0
    while step < steps and time.time() < deadline:
        step += 1
        rows = torch.randint(len(picks), (batch,), generator=generator)
        z = latents.sample(picks[rows], scale, generator)
        context = text_encoder(prompt_ids[rows]).last_hidden_state
        loss = loss_fn(unet, z, context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # only the new vectors may move
            table[keep] = original[keep]
        if step % 25 == 0 or step == 1:
            log(run_dir, f"ti step {step}/{steps} loss {loss.item():.4f}")
    vectors = table[new_ids].detach().clone()
    save_embedding(output_dir, vectors, step)
    log(run_dir, f"ti: saved {EMBEDDING_NAME} after {step} steps, moved {(vectors - original[init_ids]).norm():.3f}")


def save_embedding(output_dir: Path, vectors: torch.Tensor, step: int) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    vectors = vectors.float().contiguous()
    pt_path = output_dir / f"{EMBEDDING_NAME}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()},
                "name": EMBEDDING_NAME, "step": step, "sd_checkpoint": None,
                "sd_checkpoint_name": "tinyworld"}, pt_path)
    st_path = output_dir / f"{EMBEDDING_NAME}-st.safetensors"
    save_file({"emb_params": vectors.clone()}, str(st_path),
              metadata={"name": f"{EMBEDDING_NAME}-st", "step": str(step), "sd_checkpoint_name": "tinyworld"})
    return pt_path, st_path
