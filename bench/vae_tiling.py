"""VAE tiling cost: a full-size SD1 VAE decoding one latent untiled and tiled (+ sliced, what
Easel switches on past --vae-tile-above-pixels): time, peak process memory and PSNR/SSIM of
the tiled image against the untiled one.

    python bench/vae_tiling.py [--size 1024] [--out F] [--md]

The VAE has random weights from the bundled SD1 config (same compute as a trained one), the
latent is random normal: the image difference shows what tiling's per-tile normalisation and
seam blending change, not a picture's quality. Peak memory is the process's high-water mark
(ru_maxrss), read after the tiled decode (run first) and after the untiled one. On a GPU the
memory saving is the point; this machine has none, so only CPU figures are recorded.
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, append_section, emit, environment, markdown_table, psnr, ssim, timed  # noqa: E402

import torch  # noqa: E402


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def run(size: int, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL

    from pipelines.generate import decode_latents
    from pipelines.memory import vae_tiling

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(ROOT / "pipelines" / "configs" / "sd1" / "vae")).eval()
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    before = _peak_mb()
    images = {}

    def decode(label: str, tiled: bool) -> float:
        with vae_tiling(vae, enabled=tiled):
            return timed(lambda: images.__setitem__(label, decode_latents(vae, latent)[0]))

    tiled_s = decode("tiled", True)
    peak_tiled = _peak_mb()
    untiled_s = decode("untiled", False)
    peak_untiled = _peak_mb()
    return {"bench": "vae_tiling", "size": size, "vae": "SD1 (random weights, bundled config)",
            "tile_sample_size": vae.tile_sample_min_size, "tile_overlap": vae.tile_overlap_factor,
            "untiled_s": round(untiled_s, 2), "tiled_s": round(tiled_s, 2),
            "tiled_time_ratio": round(tiled_s / untiled_s, 3),
            "peak_rss_mb_before": before, "peak_rss_mb_after_tiled": peak_tiled,
            "peak_rss_mb_after_untiled": peak_untiled,
            "psnr_tiled_vs_untiled_db": round(psnr(images["tiled"], images["untiled"]), 2),
            "ssim_tiled_vs_untiled": round(ssim(images["tiled"], images["untiled"]), 4), "env": environment()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.size)
    emit(r, args.out)
    if args.md:
        table = markdown_table(["decode", "s", "peak RSS MB (high-water mark after)"], [
            ["tiled + sliced", r["tiled_s"], r["peak_rss_mb_after_tiled"]],
            ["untiled", r["untiled_s"], r["peak_rss_mb_after_untiled"]]])
        table += (f"\n\ntiled / untiled time: {r['tiled_time_ratio']}; tiled vs untiled image: "
                  f"PSNR {r['psnr_tiled_vs_untiled_db']} dB, SSIM {r['ssim_tiled_vs_untiled']}")
        append_section(f"VAE tiling, SD1 VAE {args.size}x{args.size}",
                       "python bench/vae_tiling.py " + " ".join(argv or sys.argv[1:]), r["env"], table)


if __name__ == "__main__":
    main()
