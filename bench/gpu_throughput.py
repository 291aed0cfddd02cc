"""GPU throughput: SD1.5 512x512 and SDXL 1024x1024, batch 1 and 4, 20 steps: it/s, s/image and
peak VRAM for plain diffusers fp16+SDPA, Easel default and Easel fast mode. CUDA only: on a
machine without CUDA it prints {"skipped": ...} and exits 0.

    python bench/gpu_throughput.py [--models sd15,sdxl] [--batches 1,4] [--steps 20] [--out F] [--md]

No network: random-weight full-size models built from the bundled configs (same compute).
"Plain" is StableDiffusion(XL)Pipeline over those modules in fp16 with torch's SDPA (diffusers'
default attention). "Easel default" runs the same modules through PipelineManager + generate
(SD1.5 only: it needs a single file; tests/factories writes a full-size SD1.5 one). "Easel fast"
is Easel with Optimizations(fast=True) (channels_last + fused QKV; add --compile for regional
torch.compile). it/s = denoiser steps per second for the batch (CFG on, UNet batch 2x).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ROOT, append_section, emit, environment, make_manager, markdown_table,  # noqa: E402
                          models_folder, timed)

import torch  # noqa: E402

CONFIGS = ROOT / "pipelines" / "configs"
PROMPT = "a photo of an astronaut riding a horse"


def _plain_pipe(model: str, device, dtype):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines import configs

    arch = CONFIGS / ("sd1" if model == "sd15" else "sdxl")
    build = lambda cls, cfg: cls.from_config(cfg).to(device, dtype).eval()  # noqa: E731
    unet = build(UNet2DConditionModel, UNet2DConditionModel.load_config(arch / "unet"))
    vae = build(AutoencoderKL, AutoencoderKL.load_config(arch / "vae"))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(arch / "scheduler"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(arch / "text_encoder")).to(device, dtype).eval()
    tok = configs.load_tokenizer()
    if model == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(arch / "text_encoder_2")).to(device, dtype)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2.eval(), tokenizer=tok,
                                         tokenizer_2=configs.load_tokenizer(pad_with_bang=True),
                                         unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _measure(fn, steps: int, batch: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --smoke on CPU: wall time, no VRAM
        seconds = timed(fn)
        return {"it_s": round(steps / seconds, 3), "s_per_image": round(seconds / batch, 3), "peak_vram_gb": None}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return {"it_s": round(steps / seconds, 2), "s_per_image": round(seconds / batch, 3),
            "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _empty_cache() -> None:
    if torch.cuda.is_available():
        _empty_cache()


def run(models, batches, steps: int, compile_: bool, smoke_size: int | None = None) -> list[dict]:
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    rows = []
    for model in models:
        size = smoke_size or (512 if model == "sd15" else 1024)
        pipe = _plain_pipe(model, device, dtype)
        for batch in batches:
            call = lambda: pipe(PROMPT, negative_prompt="", width=size, height=size, num_inference_steps=steps,  # noqa: E731
                                num_images_per_prompt=batch, guidance_scale=7.0)
            rows.append({"model": model, "size": size, "batch": batch, "config": "plain diffusers fp16+SDPA",
                         **_measure(call, steps, batch)})
        del pipe
        _empty_cache()
        if model != "sd15":
            continue  # Easel rows need a full-size single file; only the SD1.5 factory exists
        from pipelines.optimizations import Optimizations
        from tests import factories
        root = Path(tempfile.mkdtemp(prefix="easel-bench-gpu-"))
        try:
            factories.write_full_size_sd15_checkpoint(models_folder(root) / "sd15.safetensors")
            for label, opts in (("Easel default", Optimizations()),
                                ("Easel fast" + (" + compile" if compile_ else ""),
                                 Optimizations(fast=True, compile=compile_))):
                manager = make_manager(root, device, dtype, optimizations=opts)
                for batch in batches:
                    request = GenerationRequest(prompt=PROMPT, checkpoint="sd15.safetensors", width=size, height=size,
                                                steps=steps, batch_size=batch, sampler="Euler", seed=1,
                                                save_images=False)
                    rows.append({"model": model, "size": size, "batch": batch, "config": label,
                                 **_measure(lambda: generate(manager, None, request), steps, batch,
                                            warmup=2 if compile_ else 1)})
                manager.unload()
                del manager
                _empty_cache()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="fast mode with regional torch.compile")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU: SD1.5 only, 64 px, 1 step, batch 1 (numbers meaningless)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = run(["sd15"], [1], 1, False, smoke_size=64)
        emit({"bench": "gpu_throughput", "smoke": True, "rows": rows, "env": environment()}, args.out)
        return 0
    if not torch.cuda.is_available():
        emit({"bench": "gpu_throughput", "skipped": "no CUDA device: run this on a GPU machine"}, args.out)
        return 0
    rows = run(args.models.split(","), [int(b) for b in args.batches.split(",")], args.steps, args.compile)
    result = {"bench": "gpu_throughput", "steps": args.steps, "rows": rows, "env": environment()}
    emit(result, args.out)
    if args.md:
        append_section("GPU throughput", "python bench/gpu_throughput.py " + " ".join(argv or sys.argv[1:]),
                       result["env"], markdown_table(
                           ["model", "size", "batch", "config", "it/s", "s/image", "peak VRAM GB"],
                           [[r["model"], r["size"], r["batch"], r["config"], r["it_s"], r["s_per_image"],
                             r["peak_vram_gb"]] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
