"""Train the tiny-world model family: `python -m tools.tinyworld.train --run-dir tools/tinyworld/runs/main`.

Stages (run all, or one with --stage): data -> vae -> latents -> text -> unet -> export, then
the adapters trained on the exported checkpoint: vae2 (warm VAE), ti (embedding), lora
(stripes), controlnet (canny).
Every stage is seeded and reads what the previous stage wrote to the run folder, so a stage can
be rerun alone. Never run by CI; CI uses the committed files in assets/tinyworld/.

Design choices that make text adherence learnable on a 2-core CPU (see the feasibility note):
- The text encoder is a real CLIPTextModel (real CLIP vocabulary) trained first, alone, to write
  each caption's meaning (foreground colour, shape, background colour in separate subspaces)
  into every position after the caption, then frozen (tools/tinyworld/text_encoder.py): the
  UNet's cross-attention gets the meaning even before it has learnt where to look.
- The UNet's GroupNorms have 4 groups (pipelines/configs/tinyworld/unet): 32 groups over 32
  channels is one channel per group, which takes every channel's spatial mean away, and the
  output layer (norm -> SiLU -> conv) can then paint a flat background only in the colour of its
  bias - the data's mean, whatever the prompt.
- The UNet predicts v (tools/tinyworld/objective.py says why) with min-SNR weighting and EMA
  weights; latents are cached once, and the
  ground-truth classifier scores short sampling runs every few hundred steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.tinyworld import world
from tools.tinyworld.objective import DiffusionLoss, make_scheduler
from tools.tinyworld.text_encoder import tokenize

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "pipelines" / "configs" / "tinyworld"
STAGES = ("data", "vae", "latents", "text", "unet", "export", "vae2", "ti", "lora", "controlnet")
ASSETS_DIR = REPO_ROOT / "assets" / "tinyworld"


def log(run_dir: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(run_dir / "train.log", "a") as handle:
        handle.write(line + "\n")


# ----------------------------------------------------------------------------- data


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def stage_data(run_dir: Path, n_images: int, seed: int) -> None:
    samples = world.sample_dataset(n_images, seed=seed)
    combos = world.all_combinations()
    index = {combo: i for i, combo in enumerate(combos)}
    images = np.stack([np.asarray(s.image) for s in samples])
    labels = np.array([index[(s.fg, s.shape, s.bg)] for s in samples], dtype=np.int64)
    np.savez(run_dir / "data.npz", images=images, labels=labels)
    log(run_dir, f"data: {n_images} images, seed {seed}")


def load_data(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(run_dir / "data.npz")
    return data["images"], data["labels"]


# ----------------------------------------------------------------------------- VAE


def stage_vae(run_dir: Path, device: str, seed: int, steps: int, batch: int, lr: float, kl_weight: float,
              crop: int, resume: bool) -> None:
    """Train on random `crop`-pixel crops: the VAE is convolutional, and a 32px crop costs a quarter."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    images, _ = load_data(run_dir)
    if resume:  # a second round on top of the saved VAE (README lists the rounds used)
        vae = AutoencoderKL.from_pretrained(run_dir / "vae").to(device).train()
        generator_offset = 1
    else:
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "vae")).to(device)
        generator_offset = 0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = np.random.default_rng(seed + generator_offset)
    start = time.time()
    for step in range(1, steps + 1):
        top, left = (int(v) for v in generator.integers(0, images.shape[1] - crop + 1, size=2))
        picked = images[generator.integers(len(images), size=batch), top : top + crop, left : left + crop]
        batch_images = images_to_tensor(np.ascontiguousarray(picked)).to(device)
        posterior = vae.encode(batch_images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, batch_images)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == 1:
            log(run_dir, f"vae step {step}/{steps} mse {mse.item():.4f} kl {kl.item():.2f} {time.time() - start:.0f}s")
        if step % 200 == 0 or step == steps:
            vae.save_pretrained(run_dir / "vae")
    vae.eval()
    scale = measure_scaling_factor(vae, images, device)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(run_dir / "vae")
    accuracy = vae_round_trip_accuracy(vae, images[-300:], device)
    log(run_dir, f"vae done: scaling_factor {scale:.4f}, classifier agreement after round trip {accuracy}")


@torch.no_grad()
def measure_scaling_factor(vae, images: np.ndarray, device: str, n: int = 2000) -> float:
    means = [vae.encode(images_to_tensor(images[i : i + 200]).to(device)).latent_dist.mean for i in range(0, n, 200)]
    return float(1.0 / torch.cat(means).std())


@torch.no_grad()
def vae_round_trip_accuracy(vae, images: np.ndarray, device: str) -> dict:
    decoded = tensor_to_images(vae.decode(vae.encode(images_to_tensor(images).to(device)).latent_dist.mean).sample)
    return score_images(decoded, [world.classify(img) for img in images])


def score_images(images: np.ndarray, truths) -> dict:
    hits = {"bg": 0, "fg": 0, "shape": 0}
    for image, truth in zip(images, truths):
        got = world.classify(image)
        hits["bg"] += got.bg == truth.bg
        hits["fg"] += got.fg == truth.fg
        hits["shape"] += got.shape == truth.shape
    return {k: round(v / len(images), 3) for k, v in hits.items()}


# ----------------------------------------------------------------------------- latents


@torch.no_grad()
def stage_latents(run_dir: Path, device: str) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(run_dir / "vae").to(device).eval()
    images, _ = load_data(run_dir)
    means, stds = [], []
    for i in range(0, len(images), 250):
        dist = vae.encode(images_to_tensor(images[i : i + 250]).to(device)).latent_dist
        means.append(dist.mean.half().cpu())
        stds.append(dist.std.half().cpu())
    torch.save({"mean": torch.cat(means), "std": torch.cat(stds)}, run_dir / "latents.pt")
    log(run_dir, f"latents: cached {len(images)}")


# ----------------------------------------------------------------------------- text encoder


def load_clip_tokenizer(tokenizer_dir: Path | None = None):
    """Easel's offline CLIP tokenizer, or one saved at `tokenizer_dir` (same vocabulary)."""
    if tokenizer_dir is not None:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    from pipelines.configs import load_tokenizer

    return load_tokenizer()


def stage_text(run_dir: Path, seed: int, steps: int, lr: float, tokenizer_dir: Path | None) -> None:
    """Teach the text encoder the captions' meaning (tools/tinyworld/text_encoder.py says why)."""
    from tools.tinyworld.text_encoder import meaning_accuracy, train_text_encoder

    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    model, space = train_text_encoder(tokenizer, CONFIG_DIR / "text_encoder", seed, steps=steps, lr=lr,
                                      log=lambda message: log(run_dir, message))
    model.save_pretrained(run_dir / "text_encoder")
    log(run_dir, f"text encoder done: meaning read from the mean output {meaning_accuracy(model, tokenizer, space)}")


# ----------------------------------------------------------------------------- UNet


def held_out_pairs(n: int, seed: int = 20261122) -> list[tuple[tuple[str, str, str], int]]:
    """(combo, noise seed) pairs the trainer never sees as (image, noise) pairs."""
    rng = np.random.default_rng(seed)
    combos = world.all_combinations()
    picks = rng.permutation(len(combos))[:n] if n <= len(combos) else rng.integers(len(combos), size=n)
    return [(combos[int(i)], 10_000 + k) for k, i in enumerate(picks)]


@torch.no_grad()
def sample(unet, vae, embeddings: torch.Tensor, uncond: torch.Tensor, seeds: list[int], steps: int, cfg: float, device: str):
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    latents = torch.stack(
        [torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]
    ).to(device)
    context = torch.cat([uncond.expand(len(seeds), -1, -1), embeddings]).to(device)
    for t in scheduler.timesteps:
        uncond, text = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(uncond + cfg * (text - uncond), t, latents).prev_sample
    return tensor_to_images(vae.decode(latents / vae.config.scaling_factor).sample)


def evaluate_unet(unet, vae, table: torch.Tensor, pairs, device: str, steps: int = 20, cfg: float = 5.0):
    combos = world.all_combinations()
    index = {c: i for i, c in enumerate(combos)}
    embeddings = table[[index[c] for c, _ in pairs]]
    images = sample(unet, vae, embeddings, table[-1:], [s for _, s in pairs], steps, cfg, device)
    truths = [world.Classification(bg=c[2], fg=c[0], shape=c[1]) for c, _ in pairs]
    return score_images(images, truths), images


def save_grid(images: np.ndarray, path: Path, columns: int = 10) -> None:
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    size = images.shape[1]
    grid = np.zeros((rows * size, columns * size, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    Image.fromarray(grid).save(path)


def stage_unet(run_dir: Path, device: str, seed: int, steps: int, batch: int, lr: float, eval_every: int,
               eval_pairs: int, eval_steps: int, minutes: float, resume: bool, tokenizer_dir: Path | None) -> None:
    """The UNet, conditioned by the frozen text encoder of `--stage text` (its outputs for the 90
    captions and the empty prompt are computed once: a table of contexts)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    text_encoder = CLIPTextModel.from_pretrained(run_dir / "text_encoder").eval()
    prompts = [world.caption(*combo) for combo in world.all_combinations()] + [""]
    with torch.no_grad():
        table = text_encoder(tokenize(tokenizer, prompts)).last_hidden_state.to(device)
    vae = AutoencoderKL.from_pretrained(run_dir / "vae").to(device).eval()
    cached = torch.load(run_dir / "latents.pt")
    latent_mean, latent_std = cached["mean"].float(), cached["std"].float()
    _, labels = load_data(run_dir)
    labels = torch.from_numpy(labels)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "unet")).to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    state_path = run_dir / "unet_state.pt"
    start_step = 0
    best = {"score": -1.0}
    generator = torch.Generator().manual_seed(seed + 1)
    if resume and state_path.exists():
        state = torch.load(state_path)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, best = state["step"], state["best"]
        generator.set_state(state["rng"])
        log(run_dir, f"unet: resumed at step {start_step}")
    log(run_dir, f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, batch {batch}, lr {lr}")
    objective = DiffusionLoss(device)
    scheduler = objective.scheduler
    scale = vae.config.scaling_factor
    pairs = held_out_pairs(eval_pairs)
    deadline = time.time() + minutes * 60
    start = time.time()
    step = start_step
    while step < steps and time.time() < deadline:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 100)
        idx = torch.randint(len(labels), (batch,), generator=generator)
        z = (latent_mean[idx] + latent_std[idx] * torch.randn(batch, 4, 16, 16, generator=generator)) * scale
        caption = labels[idx].clone()
        caption[torch.rand(batch, generator=generator) < 0.1] = len(prompts) - 1  # empty prompt, for CFG
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        z, noise, t = z.to(device), noise.to(device), t.to(device)
        prediction = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=table[caption.to(device)]).sample
        loss = objective.score(prediction, z, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 10 == 0 or step == start_step + 1:
            log(run_dir, f"unet step {step}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s")
        if step % eval_every == 0 or step == steps or time.time() >= deadline:
            scores, images = evaluate_unet(ema, vae, table, pairs, device, steps=eval_steps)
            total = scores["bg"] + scores["fg"] + scores["shape"]
            log(run_dir, f"eval step {step}: {scores}")
            save_grid(images, run_dir / f"samples_{step:06d}.png")
            if total > best["score"]:
                best = {"score": total, "step": step, **scores}
                ema.save_pretrained(run_dir / "unet_best")
                log(run_dir, f"new best at step {step}")
            ema.save_pretrained(run_dir / "unet_last")
            torch.save(
                {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "best": best, "rng": generator.get_state()},
                state_path,
            )
            (run_dir / "best.json").write_text(json.dumps(best, indent=2))
    log(run_dir, f"unet done at step {step}, best {best}")


# ----------------------------------------------------------------------------- export


def stage_export(run_dir: Path, output: Path, which: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from pipelines.ldm_convert import pipeline_to_ldm

    unet = UNet2DConditionModel.from_pretrained(run_dir / f"unet_{which}")
    vae = AutoencoderKL.from_pretrained(run_dir / "vae")
    text_encoder = CLIPTextModel.from_pretrained(run_dir / "text_encoder")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in pipeline_to_ldm(unet, vae, text_encoder).items()}
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").exists() else {}
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "easel/tiny-world-v1",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "tiny-world",
        "modelspec.resolution": "64x64",
        "modelspec.license": "CC0-1.0",
        "modelspec.description": (
            "Easel's built-in 64px demo model, trained from scratch on a synthetic world of flat shapes: "
            "'a {colour} {shape} on a {colour} background'. "
            f"Scaling factor {vae.config.scaling_factor:.4f}. Training step {best.get('step', '?')}."
        ),
        "modelspec.date": time.strftime("%Y-%m-%d"),
        "modelspec.author": "Easel",
        "easel.vae_scaling_factor": f"{vae.config.scaling_factor:.6f}",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output), metadata=metadata)
    log(run_dir, f"export: {output} ({output.stat().st_size / 1e6:.1f} MB, {len(state)} tensors)")


# ----------------------------------------------------------------------------- adapters


def run_adapter_stage(stage: str, args) -> None:
    """The adapter stages live in their own modules; each trains on the exported checkpoint (--output)."""
    common = dict(run_dir=args.run_dir, base=args.output, seed=args.seed, batch=args.adapter_batch, minutes=args.adapter_minutes)
    if stage == "vae2":
        from tools.tinyworld.vae2 import OUTPUT_NAME, stage_vae2

        stage_vae2(output=args.assets_dir / "VAE" / OUTPUT_NAME, steps=args.vae2_steps, lr=args.vae2_lr, **common)
    elif stage == "ti":
        from tools.tinyworld.ti import stage_ti

        stage_ti(output_dir=args.assets_dir / "embeddings", steps=args.ti_steps, lr=args.ti_lr, **common)
    elif stage == "lora":
        from tools.tinyworld.lora import stage_lora

        stage_lora(output_dir=args.assets_dir / "Lora", steps=args.lora_steps, lr=args.lora_lr,
                   rank=args.lora_rank, **common)
    else:
        from tools.tinyworld.controlnet import stage_controlnet

        stage_controlnet(output_dir=args.assets_dir / "ControlNet", steps=args.cn_steps, lr=args.cn_lr,
                         resume=args.resume, **common)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path(__file__).parent / "runs" / "main")
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--vae-crop", type=int, default=32)
    parser.add_argument("--text-steps", type=int, default=1500)
    parser.add_argument("--text-lr", type=float, default=5e-3)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--unet-minutes", type=float, default=70.0, help="stop the UNet stage after this wall time")
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--eval-pairs", type=int, default=30, help="held-out (prompt, seed) pairs per evaluation")
    parser.add_argument("--eval-steps", type=int, default=10, help="DDIM steps per evaluation sample (CFG 5)")
    parser.add_argument("--resume", action="store_true",
                        help="VAE/ControlNet: train another round on the saved model; UNet: continue from unet_state.pt")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="a saved CLIPTokenizer (default: Easel's)")
    parser.add_argument("--export-from", choices=("best", "last"), default="best")
    parser.add_argument("--output", type=Path, default=ASSETS_DIR / "tinyworld.safetensors")
    parser.add_argument("--assets-dir", type=Path, default=ASSETS_DIR,
                        help="where the adapter stages write (VAE/, embeddings/, Lora/, ControlNet/ inside)")
    parser.add_argument("--adapter-minutes", type=float, default=25.0, help="wall-time cap of each adapter stage")
    parser.add_argument("--vae2-steps", type=int, default=300)
    parser.add_argument("--vae2-lr", type=float, default=5e-4)
    parser.add_argument("--ti-steps", type=int, default=400)
    parser.add_argument("--ti-lr", type=float, default=5e-3)
    parser.add_argument("--lora-steps", type=int, default=600)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--cn-steps", type=int, default=2000)
    parser.add_argument("--cn-lr", type=float, default=1e-3)
    parser.add_argument("--adapter-batch", type=int, default=16)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        started = time.time()
        if stage == "data":
            stage_data(args.run_dir, args.images, args.seed)
        elif stage == "vae":
            stage_vae(args.run_dir, args.device, args.seed, args.vae_steps, args.vae_batch, args.vae_lr, args.vae_kl,
                      args.vae_crop, args.resume)
        elif stage == "latents":
            stage_latents(args.run_dir, args.device)
        elif stage == "text":
            stage_text(args.run_dir, args.seed, args.text_steps, args.text_lr, args.tokenizer_dir)
        elif stage == "unet":
            stage_unet(args.run_dir, args.device, args.seed, args.unet_steps, args.unet_batch, args.unet_lr,
                       args.eval_every, args.eval_pairs, args.eval_steps, args.unet_minutes, args.resume,
                       args.tokenizer_dir)
        elif stage == "export":
            stage_export(args.run_dir, args.output, args.export_from)
        else:
            run_adapter_stage(stage, args)
        log(args.run_dir, f"stage {stage} took {time.time() - started:.0f}s")


if __name__ == "__main__":
    from pipelines.offline import configure_environment

    configure_environment(online=False)
    main()
