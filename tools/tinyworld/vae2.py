"""`--stage vae2`: a second VAE whose decoder paints warmer colours, saved as an A1111 VAE file.

The encoder is the base VAE's, unchanged (so img2img encodes as before); only the decoder is
fine-tuned, on the cached latents of the training set, towards `warm(image)`. The file holds
un-prefixed LDM keys (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`) like the
VAEs users put in models/VAE.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.tinyworld.finetune import load_base_pipeline, load_latents
from tools.tinyworld.train import images_to_tensor, load_data, log

OUTPUT_NAME = "tinyworld-warm.vae.safetensors"


def warm(images: np.ndarray) -> np.ndarray:
    """The target look: more red, less blue (uint8 (..., 3) in, uint8 out)."""
    pixels = images.astype(np.float32)
    pixels[..., 0] = 30.0 + 0.9 * pixels[..., 0]
    pixels[..., 1] = 6.0 + 0.95 * pixels[..., 1]
    pixels[..., 2] = 0.72 * pixels[..., 2]
    return np.clip(pixels.round(), 0, 255).astype(np.uint8)


def warmth(images: np.ndarray) -> float:
    """Mean red minus mean blue over a batch of uint8 images: what `warm` raises."""
    pixels = np.asarray(images, dtype=np.float32)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


def stage_vae2(run_dir: Path, base: Path, output: Path, seed: int, steps: int, batch: int, lr: float, minutes: float) -> None:
    from pipelines.ldm_convert import save_ldm_checkpoint, vae_to_ldm

    torch.manual_seed(seed)
    vae = load_base_pipeline(base).vae
    images, _ = load_data(run_dir)
    latents = load_latents(run_dir)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for param in decoder_params:
        param.requires_grad_(True)
    vae.decoder.train()
    optimizer = torch.optim.AdamW(decoder_params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 2)
    deadline = time.time() + minutes * 60
    step = 0
    while step < steps and time.time() < deadline:
        step += 1
        idx = torch.randint(len(images), (batch,), generator=generator)
        z = latents.mean[idx]  # unscaled posterior means: what the decoder receives at inference
        target = images_to_tensor(warm(images[idx.numpy()]))
        loss = F.mse_loss(vae.decode(z).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == 1:
            log(run_dir, f"vae2 step {step}/{steps} mse {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vae_to_ldm(vae.state_dict()).items()}
    metadata = {"modelspec.title": "tiny-world warm VAE", "modelspec.license": "CC0-1.0",
                "modelspec.description": "tiny-world's VAE with a decoder fine-tuned to render warmer colours",
                "easel.training_steps": str(step)}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_ldm_checkpoint(output, state, metadata)
    log(run_dir, f"vae2: {output} after {step} steps ({output.stat().st_size / 1e6:.1f} MB)")
