"""Engine overhead: the same txt2img request through Easel (PipelineManager + generate) and
through a hand-written plain diffusers call over the same modules, alternated in one process.

    python bench/overhead.py [--model tinyworld|sd15] [--size N] [--steps N] [--repeats N] [--out F] [--md]

tinyworld: the bundled 64x64 model. sd15: a random-weight full-size SD1.5 single file (written
to a temp folder, ~2 GB) at --size (256 on CPU). Same scheduler (Euler), seed, steps, CFG.
ratio = median(easel) / median(plain); target <= 1.03. Easel's time includes its live
previews, progress and infotext; the plain call has none of that.

Same work on both sides: Easel's "Euler" with the "Automatic" schedule is A1111's Euler, which
spaces the timesteps evenly over the whole range (diffusers "linspace"); the checkpoint's own
scheduler config says "leading" (tiny-world, like SD1.5's PNDM config), so the plain call sets
timestep_spacing="linspace" as a diffusers user matching A1111 would. The result records whether
the two schedulers give the same timesteps and sigmas, and how far Easel's prompt/negative
embeddings (its A1111-style chunked encoder) are from `pipe.encode_prompt` (float rounding).
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
                          models_folder, timed)

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = "a red square on a blue background"


def plain_pipeline(components: dict):
    """What a diffusers user writes: a StableDiffusionPipeline with Euler over the same modules."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler.from_config(components["scheduler"].config, timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                   tokenizer=components["tokenizer"], unet=components["unet"], scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def same_work(manager, name: str, pipe, steps: int, device: torch.device) -> dict:
    """Do both sides sample the same timesteps from the same embeddings?"""
    from pipelines import samplers
    from pipelines.prompts.conditioning import build_conditioning

    with manager.pipeline("txt2img", name) as active:
        easel_scheduler = samplers.make_scheduler("Euler", "Automatic", dict(active.pipe.scheduler.config))
        kwargs = build_conditioning(active.pipe, [PROMPT], [""], steps=steps).pipeline_kwargs()
    easel_scheduler.set_timesteps(steps)
    pipe.scheduler.set_timesteps(steps)
    same_timesteps = bool(torch.allclose(easel_scheduler.timesteps.float(), pipe.scheduler.timesteps.float())
                          and torch.allclose(easel_scheduler.sigmas.float(), pipe.scheduler.sigmas.float()))
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(PROMPT, device, 1, True, "")
    diff = max(float((kwargs["prompt_embeds"].to(positive) - positive).abs().max()),
               float((kwargs["negative_prompt_embeds"].to(negative) - negative).abs().max()))
    return {"same_timesteps": same_timesteps, "max_prompt_embedding_diff": diff}


def run(model: str, size: int, steps: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    root = Path(tempfile.mkdtemp(prefix="easel-bench-overhead-"))
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
                                    steps=steps, cfg_scale=7.0, sampler="Euler", schedule="Automatic", seed=1234,
                                    save_images=False)
        easel = lambda: generate(manager, None, request).images[0]  # noqa: E731
        easel()  # loads the model (not timed: both paths use the loaded modules)
        with manager.pipeline("txt2img", name) as active:
            pipe = plain_pipeline(active.pipe.components)

        def plain():
            generator = torch.Generator("cpu").manual_seed(1234)
            return pipe(PROMPT, negative_prompt="", width=size, height=size, num_inference_steps=steps,
                        guidance_scale=7.0, generator=generator).images[0]

        work = same_work(manager, name, pipe, steps, device)
        first_easel, first_plain = easel(), plain()  # warm-up both
        diff = np.abs(np.asarray(first_easel, np.int16) - np.asarray(first_plain, np.int16))
        easel_s, plain_s = [], []
        for i in range(repeats):  # alternate, and alternate who goes first
            order = (("easel", easel), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("easel", easel))
            for label, fn in order:
                (easel_s if label == "easel" else plain_s).append(timed(fn))
        e, p = statistics.median(easel_s), statistics.median(plain_s)
        from pipelines import generate as generate_module
        shipped, generate_module.PREVIEW_EVERY = generate_module.PREVIEW_EVERY, 10**9
        try:  # the same without live previews: what the rest of the engine costs
            no_preview = statistics.median(timed(easel) for _ in range(repeats))
        finally:
            generate_module.PREVIEW_EVERY = shipped
        return {"bench": "overhead", "model": model, "size": size, "steps": steps, "repeats": repeats,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "easel_s": round(e, 4), "plain_s": round(p, 4), "ratio": round(e / p, 4),
                "easel_no_preview_s": round(no_preview, 4), "ratio_no_preview": round(no_preview / p, 4),
                "easel_it_s": round(steps / e, 3), "plain_it_s": round(steps / p, 3),
                "easel_all_s": [round(x, 4) for x in easel_s], "plain_all_s": [round(x, 4) for x in plain_s],
                "max_pixel_diff_easel_vs_plain": int(diff.max()), **work, "env": environment()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tinyworld", "sd15"), default="tinyworld")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true", help="append a table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (64 if args.model == "tinyworld" else 256 if device.type == "cpu" else 512)
    steps = args.steps or (20 if args.model == "tinyworld" else 2 if device.type == "cpu" else 20)
    result = run(args.model, size, steps, args.repeats, device, dtype)
    emit(result, args.out)
    if args.md:
        row = [result["model"], f"{size}x{size}", steps, result["device"], result["easel_s"], result["plain_s"],
               f"**{result['ratio']}**", result["ratio_no_preview"], result["max_pixel_diff_easel_vs_plain"]]
        append_section(f"Engine overhead: {args.model}", "python bench/overhead.py " + " ".join(argv or sys.argv[1:]),
                       result["env"], markdown_table(
                           ["model", "size", "steps", "device", "Easel s (median)", "plain diffusers s (median)",
                            "ratio", "ratio, live previews off", "max pixel diff"], [row]))


if __name__ == "__main__":
    main()
