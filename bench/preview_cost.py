"""Live-preview cost: share of step time spent on previews, and VAE decode time.

    python bench/preview_cost.py [--steps 8] [--out F] [--md]

Runs the same tiny-world txt2img through generate() with previews as shipped (every
PREVIEW_EVERY steps) and with previews off, alternated; share = (with - without) / with.
Also times one preview and one final VAE decode, for the 64 px tiny-world latent (real VAE
preview) and for a 512 px SD1 latent (linear preview; decode with a random full-size VAE).
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

import torch  # noqa: E402


def run(steps: int, repeats: int) -> dict:
    from pipelines import generate as generate_module
    from pipelines import preview
    from pipelines.request import GenerationRequest

    root = Path(tempfile.mkdtemp(prefix="easel-bench-preview-"))
    try:
        (models_folder(root) / BUILTIN.name).symlink_to(BUILTIN)
        manager = make_manager(root, torch.device("cpu"), torch.float32)
        request = GenerationRequest(prompt="a red square", checkpoint=BUILTIN.name, width=64, height=64, steps=steps,
                                    seed=1, sampler="Euler", save_images=False)
        shipped = generate_module.PREVIEW_EVERY

        def run_with(every: int) -> float:
            generate_module.PREVIEW_EVERY = every
            try:
                return timed(lambda: generate_module.generate(manager, None, request, progress=lambda _p: None))
            finally:
                generate_module.PREVIEW_EVERY = shipped
        run_with(shipped)
        with_s, without_s = [], []
        for _ in range(repeats):
            with_s.append(run_with(shipped))
            without_s.append(run_with(10**9))
        with manager.pipeline("txt2img", BUILTIN.name) as active:
            vae = active.pipe.vae
            small = torch.randn(4, 8, 8)
            tw_preview = statistics.median(timed(lambda: preview.latent_preview(vae, small)) for _ in range(5))
            tw_decode = statistics.median(timed(lambda: generate_module.decode_latents(vae, small[None]))
                                          for _ in range(5))
        big = torch.randn(4, 64, 64)
        linear = statistics.median(timed(lambda: preview.linear_preview(big)) for _ in range(5))
        from diffusers import AutoencoderKL
        sd_vae = AutoencoderKL.from_config(AutoencoderKL.load_config(Path(__file__).resolve().parents[1]
                                                                     / "pipelines" / "configs" / "sd1" / "vae")).eval()
        sd_decode = timed(lambda: generate_module.decode_latents(sd_vae, big[None]))
        w, wo = statistics.median(with_s), statistics.median(without_s)
        return {"bench": "preview_cost", "steps": steps, "preview_every": shipped,
                "tinyworld_with_previews_s": round(w, 4), "tinyworld_without_previews_s": round(wo, 4),
                "preview_share": round((w - wo) / w, 4),
                "tinyworld_preview_s": round(tw_preview, 5), "tinyworld_vae_decode_s": round(tw_decode, 5),
                "sd1_512_linear_preview_s": round(linear, 5), "sd1_512_vae_decode_s": round(sd_decode, 4),
                "env": environment()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.steps, args.repeats)
    emit(r, args.out)
    if args.md:
        table = markdown_table(["measure", "value"], [
            ["tiny-world 64px, previews every %d steps: share of generation time" % r["preview_every"],
             f"{r['preview_share'] * 100:.1f}%"],
            ["tiny-world preview (real VAE, 8x8 latent)", f"{r['tinyworld_preview_s']} s"],
            ["tiny-world final VAE decode", f"{r['tinyworld_vae_decode_s']} s"],
            ["SD1 512px linear preview (64x64 latent)", f"{r['sd1_512_linear_preview_s']} s"],
            ["SD1 512px VAE decode (full-size VAE, CPU fp32)", f"{r['sd1_512_vae_decode_s']} s"]])
        append_section("Live preview and VAE decode", "python bench/preview_cost.py " + " ".join(argv or sys.argv[1:]),
                       r["env"], table)


if __name__ == "__main__":
    main()
