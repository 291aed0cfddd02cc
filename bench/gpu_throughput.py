"""GPU throughput: SD1.5 512x512 and SDXL 1024x1024, batch 1 and 4, 20 steps: it/s, s/image and
peak VRAM for plain diffusers fp16+SDPA, Easel default and Easel fast mode. CUDA only: on a
machine without CUDA it prints {"skipped": ...} and exits 0.

    python bench/gpu_throughput.py [--models sd15,sdxl] [--batches 1,4] [--steps 20]
                                   [--compile-mode default|reduce-overhead|max-autotune] [--out F] [--md]
    python bench/gpu_throughput.py --smoke [--models sd15[,sdxl]]   # CPU check of the script

No network: random-weight full-size models built from the bundled configs (same compute).
"Plain" is StableDiffusion(XL)Pipeline over those modules in fp16 with torch's SDPA (diffusers'
default attention). "Easel default" runs a random-weight full-size single file of the same
architecture (tests/factories: write_full_size_sd15_checkpoint / write_full_size_sdxl_checkpoint)
through PipelineManager + generate. "Easel fast" is Optimizations(fast=True) (channels_last +
fused QKV); --compile-mode adds a row with torch.compile in that mode (reduce-overhead = CUDA
graphs over the whole UNet).

Two rates per row, both denoiser steps per second for the batch (CFG on, UNet batch 2x):
- `unet_it_s`: the denoising loop alone, timed between the ends of the first and the last step
  (step callbacks: CUDA events, no sync inside the loop), so text encoding, the first step and
  the VAE decode are not in it. This is the rate the published anchors quote.
- `it_s`: steps / whole call (prompt encoding, loop, VAE decode) — what a user waits for.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
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


class StepTimer:
    """A timestamp at the end of every denoising step: CUDA events on the GPU (recorded in stream
    order, read after the run, so the loop is not synchronised), perf_counter on the CPU."""

    def __init__(self) -> None:
        self.marks: list = []

    def mark(self) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_end(self, _pipe, _step, _timestep, _tensors) -> dict:  # diffusers callback_on_step_end
        self.mark()
        return {}

    def progress(self, progress) -> None:  # Easel's progress sink: one event per finished step
        if progress.step >= 1:
            self.mark()

    def loop_seconds_per_step(self) -> float | None:
        if len(self.marks) < 2:
            return None
        first, last = self.marks[0], self.marks[-1]
        seconds = first.elapsed_time(last) / 1000 if torch.cuda.is_available() else last - first
        return seconds / (len(self.marks) - 1)


def _measure(fn, steps: int, batch: int, timer: StepTimer, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    timer.marks.clear()
    if not torch.cuda.is_available():  # --smoke on CPU: wall time, no VRAM
        seconds, peak = timed(fn), None
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    per_step = timer.loop_seconds_per_step()
    return {"it_s": round(steps / seconds, 3), "unet_it_s": round(1 / per_step, 3) if per_step else None,
            "s_per_image": round(seconds / batch, 3),
            "outside_loop_s": round(seconds - steps * per_step, 3) if per_step else None,
            "peak_vram_gb": peak}


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_checkpoint(model: str, path: Path) -> Path:
    """The random-weight full-size single file Easel loads for `model` (sd15: ~2 GB, sdxl: ~6.9 GB)."""
    from tests import factories

    if model == "sd15":
        return factories.write_full_size_sd15_checkpoint(path)
    return factories.write_full_size_sdxl_checkpoint(path)


def easel_configs(compile_mode: str | None) -> list[tuple[str, object]]:
    from pipelines.optimizations import Optimizations

    configs = [("Easel default", Optimizations()), ("Easel fast", Optimizations(fast=True))]
    if compile_mode:
        configs.append((f"Easel fast + compile ({compile_mode})",
                        Optimizations(fast=True, compile=True, compile_mode=compile_mode)))
    return configs


def run(models, batches, steps: int, compile_mode: str | None = None, smoke_size: int | None = None) -> list[dict]:
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    rows = []
    for model in models:
        size = smoke_size or (512 if model == "sd15" else 1024)
        pipe = _plain_pipe(model, device, dtype)
        for batch in batches:
            timer = StepTimer()
            call = lambda: pipe(PROMPT, negative_prompt="", width=size, height=size, num_inference_steps=steps,  # noqa: E731
                                num_images_per_prompt=batch, guidance_scale=7.0, callback_on_step_end=timer.step_end)
            rows.append({"model": model, "size": size, "batch": batch, "config": "plain diffusers fp16+SDPA",
                         **_measure(call, steps, batch, timer)})
        del pipe
        _empty_cache()
        root = Path(tempfile.mkdtemp(prefix="easel-bench-gpu-"))
        try:
            name = f"{model}-random.safetensors"
            write_checkpoint(model, models_folder(root) / name)
            for label, opts in easel_configs(compile_mode):
                manager = make_manager(root, device, dtype, optimizations=opts)
                for batch in batches:
                    request = GenerationRequest(prompt=PROMPT, negative_prompt="", checkpoint=name, width=size,
                                                height=size, steps=steps, batch_size=batch, cfg_scale=7.0,
                                                sampler="Euler", seed=1, save_images=False)
                    timer = StepTimer()
                    rows.append({"model": model, "size": size, "batch": batch, "config": label,
                                 **_measure(lambda: generate(manager, None, request, progress=timer.progress), steps,
                                            batch, timer, warmup=2 if opts.compile else 1)})
                manager.unload()
                del manager
                _empty_cache()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="sd15,sdxl (default both; --smoke: sd15)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                        help="add an 'Easel fast + compile' row with torch.compile in this mode")
    parser.add_argument("--compile", action="store_const", const="default", dest="compile_mode",
                        help="same as --compile-mode default")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU: 64 px, 2 steps, batch 1 (numbers meaningless)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = run((args.models or "sd15").split(","), [1], 2, args.compile_mode, smoke_size=64)
        emit({"bench": "gpu_throughput", "smoke": True, "rows": rows, "env": environment()}, args.out)
        return 0
    if not torch.cuda.is_available():
        emit({"bench": "gpu_throughput", "skipped": "no CUDA device: run this on a GPU machine"}, args.out)
        return 0
    models = (args.models or "sd15,sdxl").split(",")
    rows = run(models, [int(b) for b in args.batches.split(",")], args.steps, args.compile_mode)
    result = {"bench": "gpu_throughput", "steps": args.steps, "rows": rows, "env": environment()}
    emit(result, args.out)
    if args.md:
        append_section("GPU throughput", "python bench/gpu_throughput.py " + " ".join(argv or sys.argv[1:]),
                       result["env"], markdown_table(
                           ["model", "size", "batch", "config", "UNet it/s (loop)", "it/s (whole call)", "s/image",
                            "peak VRAM GB"],
                           [[r["model"], r["size"], r["batch"], r["config"], r["unet_it_s"], r["it_s"],
                             r["s_per_image"], r["peak_vram_gb"]] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
