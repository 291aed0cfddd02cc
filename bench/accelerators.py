"""DeepCache and token merging (ToMe): speed and image change against the plain Easel path.

    python bench/accelerators.py [--model tinyworld|sd15] [--size N] [--steps N] [--repeats N]
                                 [--deepcache 3] [--tomesd 0.5] [--out F] [--md]

The same txt2img request (Euler, seed 1234, CFG 7) through one PipelineManager with
Optimizations() (plain), Optimizations(deepcache_interval=N) and Optimizations(tomesd_ratio=R),
alternated in one process so machine load hits every configuration alike.
speed = median(plain s) / median(config s) (> 1: faster); PSNR (dB) and SSIM (luma, Gaussian
window) of the config's image against the plain image. tinyworld: the bundled 64x64 model.
sd15: a random-weight full-size SD1.5 single file (~2 GB, written to a temp folder): the speed
is real, the image change of random weights says little about a trained model.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (BUILTIN, append_section, emit, environment, make_manager, markdown_table,  # noqa: E402
                          models_folder, psnr, ssim, timed)

import torch  # noqa: E402

PROMPT = "a red square on a blue background"


def configurations(deepcache: int, tomesd: float) -> list[tuple[str, object]]:
    from pipelines.optimizations import Optimizations

    return [("plain", Optimizations()), (f"DeepCache N={deepcache}", Optimizations(deepcache_interval=deepcache)),
            (f"ToMe ratio={tomesd:g}", Optimizations(tomesd_ratio=tomesd))]


def run(model: str, size: int, steps: int, repeats: int, deepcache: int, tomesd: float,
        device: torch.device, dtype: torch.dtype) -> dict:
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    root = Path(tempfile.mkdtemp(prefix="easel-bench-accel-"))
    try:
        folder = models_folder(root)
        if model == "tinyworld":
            (folder / BUILTIN.name).symlink_to(BUILTIN)
            name = BUILTIN.name
        else:
            from tests import factories
            name = "sd15-random.safetensors"
            factories.write_full_size_sd15_checkpoint(folder / name, seed=0)
        manager = make_manager(root, device, dtype)
        request = GenerationRequest(prompt=PROMPT, negative_prompt="", checkpoint=name, width=size, height=size,
                                    steps=steps, cfg_scale=7.0, sampler="Euler", seed=1234, save_images=False)
        configs = configurations(deepcache, tomesd)

        def once(options):
            manager.fast.options = options
            return generate(manager, None, request).images[0]

        images = {label: once(options) for label, options in configs}  # loads the model, warms up each
        seconds: dict[str, list[float]] = {label: [] for label, _ in configs}
        for i in range(repeats):
            order = configs if i % 2 == 0 else configs[::-1]  # alternate who goes first
            for label, options in order:
                seconds[label].append(timed(lambda options=options: once(options)))
        manager.fast.options = configs[0][1]
        plain_s = statistics.median(seconds["plain"])
        rows = []
        for label, _ in configs:
            median = statistics.median(seconds[label])
            rows.append({"config": label, "median_s": round(median, 4), "all_s": [round(s, 4) for s in seconds[label]],
                         "speed_vs_plain": round(plain_s / median, 3),
                         "psnr_db": None if label == "plain" else round(psnr(images[label], images["plain"]), 2),
                         "ssim": None if label == "plain" else round(ssim(images[label], images["plain"]), 4)})
        return {"bench": "accelerators", "model": model, "size": size, "steps": steps, "repeats": repeats,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "rows": rows, "env": environment()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tinyworld", "sd15"), default="tinyworld")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deepcache", type=int, default=3, help="DeepCache interval N")
    parser.add_argument("--tomesd", type=float, default=0.5, help="ToMe ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true", help="append a table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (64 if args.model == "tinyworld" else 256 if device.type == "cpu" else 512)
    steps = args.steps or (20 if args.model == "tinyworld" else 6 if device.type == "cpu" else 20)
    result = run(args.model, size, steps, args.repeats, args.deepcache, args.tomesd, device, dtype)
    emit(result, args.out)
    if args.md:
        table = markdown_table(["config", "median s", "speed vs plain", "PSNR dB vs plain", "SSIM vs plain"],
                               [[r["config"], r["median_s"], r["speed_vs_plain"], r["psnr_db"], r["ssim"]]
                                for r in result["rows"]])
        append_section(f"Accelerators: {args.model} {size}x{size}, {steps} steps",
                       "python bench/accelerators.py " + " ".join(argv or sys.argv[1:]), result["env"], table)


if __name__ == "__main__":
    main()
