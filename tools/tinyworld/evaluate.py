"""Measure a tiny-world checkpoint's text adherence with the ground-truth classifier.

`python -m tools.tinyworld.evaluate assets/tinyworld/tinyworld.safetensors --grid /tmp/grid.png`

Loads the single file the way a user's SD1 checkpoint loads offline (diffusers' from_single_file
with the bundled config and Easel's CLIP tokenizer), samples held-out (prompt, seed) pairs and
reports background / foreground colour / shape accuracy. The issue asks for this to go through
Easel's engine once it exists; until then this is diffusers' public pipeline path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tools.tinyworld import world
from tools.tinyworld.train import CONFIG_DIR, held_out_pairs, save_grid, score_images


def load_pipeline(path: Path, tokenizer_dir: Path | None = None):
    from diffusers import StableDiffusionPipeline

    from tools.tinyworld.train import load_clip_tokenizer

    return StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(CONFIG_DIR),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        tokenizer=load_clip_tokenizer(tokenizer_dir),
        torch_dtype=torch.float32,
    )


def evaluate(pipe, n_pairs: int = 60, steps: int = 20, cfg: float = 5.0, batch: int = 30):
    """Returns (scores, images): accuracies over `n_pairs` held-out pairs, and the images."""
    pairs = held_out_pairs(n_pairs)
    images = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        result = pipe(
            [world.caption(*combo) for combo, _ in chunk],
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=generators,
            output_type="np",
        )
        images.append((result.images * 255).round().astype(np.uint8))
    images = np.concatenate(images)
    truths = [world.Classification(bg=c[2], fg=c[0], shape=c[1]) for c, _ in pairs]
    return score_images(images, truths), images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--grid", type=Path, default=None, help="save the samples as a PNG grid")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    scores, images = evaluate(pipe, args.pairs, args.steps, args.cfg)
    if args.grid:
        save_grid(images, args.grid)
    print(json.dumps({"sampler": type(pipe.scheduler).__name__, "steps": args.steps, "cfg": args.cfg,
                      "pairs": args.pairs, **scores}))


if __name__ == "__main__":
    from pipelines.offline import configure_environment

    configure_environment(online=False)
    main()
