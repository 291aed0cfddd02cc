"""`--stage controlnet`: a canny ControlNet for tiny-world, made with `ControlNetModel.from_unet`.

The ControlNet starts as a copy of the shipped UNet's encoder (zero convolutions out), with a
conditioning embedding that downsamples 4x (tiny-world's VAE is 4x, SD's is 8x). It trains on
canny edge maps of the world's images (OpenCV Canny 100/200, A1111's preprocessor defaults:
white edges on black) with the base UNet frozen; half the captions are dropped so the edges
alone carry the shape. Saved as one `.safetensors` in diffusers' ControlNet key layout (which
`ControlNetModel.from_single_file` reads as it is) matching Easel's bundled
`pipelines/configs/controlnet/tinyworld/` config.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tools.tinyworld import world
from tools.tinyworld.finetune import load_base_pipeline, load_latents
from tools.tinyworld.objective import DiffusionLoss
from tools.tinyworld.train import REPO_ROOT, load_data, log, tokenize

CONTROLNET_NAME = "tw-canny"
# Easel's bundled tiny-world ControlNet config (the control lane's), which this model matches.
CONTROLNET_CONFIG_DIR = REPO_ROOT / "pipelines" / "configs" / "controlnet" / "tinyworld"
HINT_CHANNELS = (16, 32, 96)  # two stride-2 convolutions: 64 px -> the 16x16 latent


def canny(image, low: int = 100, high: int = 200) -> np.ndarray:
    """White-on-black uint8 (H, W, 3) edge map, as A1111's canny preprocessor makes it."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), low, high)
    return np.repeat(edges[..., None], 3, axis=2)


def foreground_mask(image) -> np.ndarray:
    """Pixels far from the border's median colour: the shape, in a world image or a generated one."""
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.linalg.norm(pixels - np.median(border, axis=0), axis=2) > 60.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def build_controlnet(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)


def stage_controlnet(run_dir: Path, base: Path, output_dir: Path, seed: int, steps: int, batch: int, lr: float,
                     minutes: float, resume: bool = False, n_images: int = 8000) -> None:
    """`resume`: another round on the saved ControlNet (fresh optimizer, other batches)."""
    torch.manual_seed(seed)
    pipe = load_base_pipeline(base)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    saved = output_dir / f"{CONTROLNET_NAME}.safetensors"
    if resume and saved.exists():
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_single_file(str(saved), config=str(CONTROLNET_CONFIG_DIR),
                                                      local_files_only=True, torch_dtype=torch.float32).train()
        log(run_dir, f"controlnet: resuming from {saved}")
    else:
        controlnet = build_controlnet(unet).train()
    images, labels = load_data(run_dir)
    latents = load_latents(run_dir)
    hints = torch.from_numpy(np.stack([canny(img) for img in images[:n_images]])).permute(0, 3, 1, 2)
    combos = world.all_combinations()
    with torch.no_grad():
        table = text_encoder(tokenize(tokenizer, [world.caption(*c) for c in combos] + [""])).last_hidden_state
    log(run_dir, f"controlnet: {n_images} edge maps, {sum(p.numel() for p in controlnet.parameters()) / 1e6:.2f}M parameters")

    params = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = DiffusionLoss()
    generator = torch.Generator().manual_seed(seed + 5 + (1000 if resume else 0))
    scale = vae.config.scaling_factor
    label_tensor = torch.from_numpy(labels)
    deadline = time.time() + minutes * 60
    step = 0
    while step < steps and time.time() < deadline:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        idx = torch.randint(n_images, (batch,), generator=generator)
        z = latents.sample(idx, scale, generator)
        caption = label_tensor[idx].clone()
        caption[torch.rand(batch, generator=generator) < 0.5] = len(combos)  # the empty prompt
        context = table[caption]
        cond = hints[idx].float() / 255.0
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, loss_fn.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = loss_fn.scheduler.add_noise(z, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        prediction = unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        loss = loss_fn.score(prediction, z, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 25 == 0 or step == 1:
            log(run_dir, f"controlnet step {step}/{steps} loss {loss.item():.4f}")
        if step % 200 == 0:
            save_controlnet(controlnet, output_dir, step)
    path = save_controlnet(controlnet, output_dir, step)
    log(run_dir, f"controlnet: {path} after {step} steps")


def save_controlnet(controlnet, output_dir: Path, step: int) -> Path:
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in controlnet.state_dict().items()}
    path = output_dir / f"{CONTROLNET_NAME}.safetensors"
    save_file(state, str(path), metadata={
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "easel/tiny-world-v1/controlnet",
        "modelspec.title": CONTROLNET_NAME, "modelspec.license": "CC0-1.0",
        "modelspec.description": "tiny-world canny ControlNet (diffusers key layout)",
        "easel.preprocessor": "canny", "easel.training_steps": str(step)})
    return path
