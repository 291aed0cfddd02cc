"""Plot it/s per configuration from the JSON files the bench scripts wrote.

    python bench/plot.py RESULT.json [...] --out bench/results/its.png

Reads overhead results (Easel vs plain per model), accelerators results (plain / DeepCache /
ToMe) and gpu_throughput rows (the denoising-loop rate `unet_it_s` when recorded); one bar per
configuration, grouped by the measurement it came from. The y axis is logarithmic: the rates
span tiny-world on a CPU (tens of it/s) to full-size models on a CPU (well under 1 it/s).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def bars(paths) -> list[tuple[str, float]]:
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("bench") == "quick":  # its overhead record
            data = {**data["overhead"], "env": data.get("env", {})}
        device = data.get("device") or data.get("env", {}).get("gpu", "")
        if data.get("bench") == "overhead":
            where = f"{data['model']} {data['size']}px {device}"
            out += [(f"{where}\nEasel", data["easel_it_s"]), (f"{where}\nplain", data["plain_it_s"])]
        elif data.get("bench") == "accelerators":
            where = f"{data['model']} {data['size']}px {device}"
            out += [(f"{where}\n{r['config']}", round(data["steps"] / r["median_s"], 3)) for r in data["rows"]]
        elif data.get("bench") == "gpu_throughput":
            out += [(f"{r['model']} b{r['batch']}\n{r['config']}", r.get("unet_it_s") or r["it_s"])
                    for r in data.get("rows", [])]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/its.png"))
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = bars(args.results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(data)), 4.5))
    ax.bar(range(len(data)), [v for _, v in data], color="#4a78b5")
    ax.set_xticks(range(len(data)), [k for k, _ in data], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("it/s (denoiser steps per second, log scale)")
    ax.set_title("Easel vs plain diffusers: it/s per configuration")
    for i, (_, v) in enumerate(data):
        ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
