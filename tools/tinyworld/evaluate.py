"""Measure the tiny-world family through Easel's engine, with the world's ground-truth classifier.

`python -m tools.tinyworld.evaluate [--checkpoint PATH] [--only base,vae2] [--grid out.png]`

Everything goes the way a user's request goes: an A1111-style models folder (the files linked
into `models/Stable-diffusion`, `models/VAE`, `embeddings`, `models/Lora`, `models/ControlNet`),
Easel's ModelRegistry and PipelineManager, and `pipelines.generate.generate` with a
GenerationRequest per (prompt, seed) pair. Measures:
- base: background / foreground colour / shape accuracy on held-out (prompt, seed) pairs;
- vae2: the warm VAE's colour shift (mean red minus blue, warm VAE minus the checkpoint's own);
- ti: how often "a tw-green-square on a {bg} background" shows a green square, vs the words;
- lora: fraction of striped images at LoRA weights 0, 0.5, 1 (`<lora:tw-stripes:w>` tags);
- controlnet: mean IoU of the generated shape with the shape whose canny edges conditioned it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tools.tinyworld import world
from tools.tinyworld.train import ASSETS_DIR, held_out_pairs, save_grid, score_images

STEPS, CFG, SAMPLER = 20, 5.0, "Euler"
# Where each adapter file lives under the assets folder (A1111's folder names).
FAMILY_FOLDERS = {"VAE": "models/VAE", "embeddings": "embeddings", "Lora": "models/Lora",
                  "ControlNet": "models/ControlNet"}


@dataclass(frozen=True)
class Setting:
    """How every sample is drawn: the issue's bar is measured at 20 steps, CFG 5."""
    steps: int = STEPS
    cfg: float = CFG
    sampler: str = SAMPLER


def models_folder(root: Path, assets_dir: Path = ASSETS_DIR, checkpoint: Path | None = None) -> Path:
    """An A1111-style folder under `root` linking the family's files (and `checkpoint`, if given;
    without it the engine uses the built-in tiny-world from `assets_dir`)."""
    (root / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        (root / "models" / "Stable-diffusion" / Path(checkpoint).name).symlink_to(Path(checkpoint).resolve())
    for source, target in FAMILY_FOLDERS.items():
        (root / target).mkdir(parents=True, exist_ok=True)
        for path in sorted((assets_dir / source).glob("*")) if (assets_dir / source).is_dir() else []:
            (root / target / path.name).symlink_to(path.resolve())
    return root


def open_engine(root: Path, data_dir: Path, builtin_dir: Path = ASSETS_DIR):
    """Easel's registry and PipelineManager over `root` (as app.py wires them), CPU fp32."""
    from pipelines.cache import ModelCache
    from pipelines.hashing import HashCache
    from pipelines.manager import PipelineManager
    from pipelines.registry import ModelPaths, ModelRegistry

    paths = ModelPaths(models_dir=root / "models", embeddings_dir=root / "embeddings", builtin_dir=builtin_dir)
    registry = ModelRegistry(paths, HashCache(data_dir / "hashes.json"))
    registry.refresh()
    return PipelineManager(registry, ModelCache(1 << 30), torch.device("cpu"), torch.float32)


def render(manager, prompt: str, seed: int, setting: Setting = Setting(), **fields) -> np.ndarray:
    """One 64x64 image through `generate`, as uint8 (H, W, 3)."""
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    request = GenerationRequest(prompt=prompt, seed=seed, width=64, height=64, steps=setting.steps,
                                cfg_scale=setting.cfg, sampler=setting.sampler, save_images=False, **fields)
    return np.asarray(generate(manager, None, request).images[0])


def adherence(manager, pairs, setting: Setting = Setting(), **fields) -> tuple[dict, np.ndarray]:
    """Classifier accuracy (bg, fg, shape) of the captions of `pairs`, and the images."""
    images = np.stack([render(manager, world.caption(*combo), seed, setting, **fields) for combo, seed in pairs])
    truths = [world.Classification(bg=c[2], fg=c[0], shape=c[1]) for c, _ in pairs]
    return score_images(images, truths), images


def colour_shift(manager, vae_name: str, pairs, setting: Setting = Setting()) -> dict:
    """Mean (red - blue) of the same samples decoded by `vae_name` and by the checkpoint's VAE."""
    from tools.tinyworld.vae2 import warmth

    shifts = []
    for combo, seed in pairs:
        prompt = world.caption(*combo)
        base = render(manager, prompt, seed, setting, vae="None")
        other = render(manager, prompt, seed, setting, vae=vae_name)
        shifts.append(warmth(other[None]) - warmth(base[None]))
    shifts = np.array(shifts)
    return {"mean_red_minus_blue_shift": round(float(shifts.mean()), 1),
            "warmer_fraction": round(float((shifts > 0).mean()), 3)}


def concept_accuracy(manager, seeds: list[int], setting: Setting = Setting()) -> dict:
    """How often the classifier sees a green square: the embedding's prompt vs the base words."""
    from tools.tinyworld.ti import CONCEPT, EMBEDDING_NAME, concept_prompt

    backgrounds = [c for c in world.COLOURS if c != CONCEPT[0]]
    result = {}
    for label, token in (("embedding", EMBEDDING_NAME), ("words", " ".join(CONCEPT))):
        hits = 0
        for k, seed in enumerate(seeds):
            got = world.classify(render(manager, concept_prompt(backgrounds[k % len(backgrounds)], token), seed, setting))
            hits += (got.fg, got.shape) == CONCEPT
        result[label] = round(hits / len(seeds), 3)
    return result


def texture_scores(manager, pairs, weights=(0.0, 0.5, 1.0), setting: Setting = Setting()) -> dict:
    """Fraction of striped images at each LoRA weight (prompt tag + trigger word), and whether
    weight 0 gives the base picture pixel for pixel."""
    from tools.tinyworld.lora import LORA_NAME, TRIGGER, is_striped

    result = {}
    base = [render(manager, f"{world.caption(*c)}, {TRIGGER}", seed, setting) for c, seed in pairs]
    for weight in weights:
        images = [render(manager, f"{world.caption(*c)}, {TRIGGER} <lora:{LORA_NAME}:{weight:g}>", seed, setting)
                  for c, seed in pairs]
        result[f"striped_at_{weight:g}"] = round(float(np.mean([is_striped(i) for i in images])), 3)
        if weight == 0:
            result["weight_0_identical_to_base"] = all(np.array_equal(a, b) for a, b in zip(images, base))
    result["striped_without_lora"] = round(float(np.mean([is_striped(i) for i in base])), 3)
    return result


def controlnet_iou(manager, n: int, setting: Setting = Setting(), seed: int = 4242) -> dict:
    """Mean IoU of the generated shape's mask with the mask of the world image whose canny edges
    were the condition, and without the ControlNet for comparison."""
    from PIL import Image

    from pipelines.control.units import ControlUnit
    from tools.tinyworld.controlnet import CONTROLNET_NAME, canny, foreground_mask, mask_iou

    samples = world.sample_dataset(n, seed=seed)
    with_cn, without = [], []
    for k, sample in enumerate(samples):
        source = np.asarray(sample.image)
        unit = ControlUnit(module="none", model=CONTROLNET_NAME, image=Image.fromarray(canny(source)),
                           resize_mode="Just Resize", processor_res=64)
        truth = foreground_mask(source)
        image = render(manager, sample.caption, 20_000 + k, setting, control_units=(unit,))
        plain = render(manager, sample.caption, 20_000 + k, setting)
        with_cn.append(mask_iou(foreground_mask(image), truth))
        without.append(mask_iou(foreground_mask(plain), truth))
    return {"mean_iou": round(float(np.mean(with_cn)), 3), "mean_iou_without_controlnet": round(float(np.mean(without)), 3)}


def evaluate_family(manager, assets_dir: Path, n_pairs: int, setting: Setting, only: set[str]) -> dict:
    results: dict = {"setting": vars(setting), "pairs": n_pairs}
    pairs = held_out_pairs(n_pairs)
    if "base" in only:
        results["base"], results["_base_images"] = adherence(manager, pairs, setting)
    if "vae2" in only and (assets_dir / "VAE").is_dir():
        from tools.tinyworld.vae2 import OUTPUT_NAME

        results["vae2"] = colour_shift(manager, OUTPUT_NAME, pairs[:20], setting)
    if "ti" in only and (assets_dir / "embeddings").is_dir():
        results["ti"] = concept_accuracy(manager, [s for _, s in pairs], setting)
    if "lora" in only and (assets_dir / "Lora").is_dir():
        results["lora"] = texture_scores(manager, pairs[:20], setting=setting)
    if "controlnet" in only and (assets_dir / "ControlNet").is_dir():
        results["controlnet"] = controlnet_iou(manager, min(n_pairs, 30), setting)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the built-in tiny-world")
    parser.add_argument("--assets-dir", type=Path, default=ASSETS_DIR)
    parser.add_argument("--only", default="base,vae2,ti,lora,controlnet")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cfg", type=float, default=CFG)
    parser.add_argument("--sampler", default=SAMPLER)
    parser.add_argument("--grid", type=Path, default=None, help="save the base samples as a PNG grid")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tinyworld-eval-") as tmp:
        root = models_folder(Path(tmp), args.assets_dir, args.checkpoint)
        manager = open_engine(root, Path(tmp), builtin_dir=args.assets_dir)
        setting = Setting(args.steps, args.cfg, args.sampler)
        results = evaluate_family(manager, args.assets_dir, args.pairs, setting, set(args.only.split(",")))
    images = results.pop("_base_images", None)
    if args.grid is not None and images is not None:
        save_grid(images, args.grid)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    from pipelines.offline import configure_environment

    configure_environment(online=False)
    main()
