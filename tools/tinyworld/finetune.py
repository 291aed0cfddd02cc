"""What every adapter stage (vae2, ti, lora, controlnet) shares: the shipped base model, the
cached latents, and the base's diffusion loss (tools/tinyworld/objective.py).

Adapters are trained on top of the *shipped* checkpoint (the fp16 single file, read in fp32),
because that is the model users apply them to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tools.tinyworld import world
from tools.tinyworld.train import CONFIG_DIR, REPO_ROOT, load_data

BASE_CHECKPOINT = REPO_ROOT / "assets" / "tinyworld" / "tinyworld.safetensors"


def load_base_pipeline(path: Path = BASE_CHECKPOINT):
    """The shipped checkpoint through diffusers' single-file path, fp32, as a user's SD1 loads."""
    from diffusers import StableDiffusionPipeline

    from pipelines.configs import load_tokenizer

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(CONFIG_DIR), local_files_only=True, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, tokenizer=load_tokenizer(),
        torch_dtype=torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LatentSet:
    """Posterior mean/std per training image (as `--stage latents` cached them) and the labels."""
    mean: torch.Tensor
    std: torch.Tensor
    combos: list[tuple[str, str, str]]  # (fg, shape, bg) per image

    def sample(self, idx: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(len(idx), *self.mean.shape[1:], generator=generator)
        return (self.mean[idx] + self.std[idx] * noise) * scale


def load_latents(run_dir: Path) -> LatentSet:
    cached = torch.load(run_dir / "latents.pt")
    _, labels = load_data(run_dir)
    combos = world.all_combinations()
    return LatentSet(cached["mean"].float(), cached["std"].float(), [combos[int(i)] for i in labels])


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, 3) -> posterior (mean, std), for data the run folder has no cache of."""
    from tools.tinyworld.train import images_to_tensor

    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images_to_tensor(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)
