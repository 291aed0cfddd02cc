"""Model switching through the real PipelineManager, as ratios to a cold checkpoint load, and
process memory (RSS) over many switches.

    python bench/switching.py [--switches 100] [--out F] [--md] [--with-lora]

Two tiny random-weight checkpoints and two VAEs in a temp models folder (tiny-world layout).
- cold_load_s: a fresh manager's first request (file -> RAM -> device);
- cached_switch_s: checkpoint A <-> B with both in the RAM cache;
- vae_swap_s: VAE X <-> Y on the same checkpoint;
- lora_switch_s: from bench/lora_switch.py (--with-lora), switching among resident LoRAs;
- rss_mb: RSS sampled every 10 switches over --switches alternating checkpoint+VAE switches;
  growth_mb = last - first sample (after the first full cycle): should be ~0.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (append_section, emit, environment, make_manager, markdown_table, models_folder,  # noqa: E402
                          rss_bytes, timed)

import torch  # noqa: E402


def _enter(manager, checkpoint: str, vae: str = "None") -> None:
    with manager.pipeline("txt2img", checkpoint, vae):
        pass


def run(switches: int, device: torch.device, dtype: torch.dtype, with_lora: bool) -> dict:
    from tests import factories

    root = Path(tempfile.mkdtemp(prefix="easel-bench-switch-"))
    try:
        folder = models_folder(root)
        factories.write_tiny_checkpoint(folder / "a.safetensors", seed=0)
        factories.write_tiny_checkpoint(folder / "b.safetensors", seed=1)
        factories.write_tiny_vae(root / "models" / "VAE" / "x.safetensors", seed=2)
        factories.write_tiny_vae(root / "models" / "VAE" / "y.safetensors", seed=3)

        cold = []
        for _ in range(4):  # the first also pays the OS page cache
            manager = make_manager(root, device, dtype)
            cold.append(timed(lambda: _enter(manager, "a.safetensors")))
        _enter(manager, "b.safetensors")
        _enter(manager, "a.safetensors", "x.safetensors")
        _enter(manager, "a.safetensors", "y.safetensors")
        loads = dict(manager.load_counts)
        cached = [timed(lambda i=i: _enter(manager, "ab"[i % 2] + ".safetensors")) for i in range(20)]
        vae = [timed(lambda i=i: _enter(manager, "a.safetensors", "xy"[i % 2] + ".safetensors")) for i in range(20)]
        same = [timed(lambda: _enter(manager, "a.safetensors")) for _ in range(20)]

        gc.collect()
        rss = []
        for i in range(switches):
            _enter(manager, "ab"[i % 2] + ".safetensors", "xy"[(i // 2) % 2] + ".safetensors")
            if i % 10 == 9:
                gc.collect()
                rss.append(round(rss_bytes() / 2**20, 1))
        assert dict(manager.load_counts) == loads, "a switch reloaded from disk"

        cold_s = statistics.median(cold[1:])
        result = {"bench": "switching", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                  "model": "tiny random SD1 (tiny-world layout)",
                  "cold_load_s": round(cold_s, 4), "cold_load_first_s": round(cold[0], 4),
                  "cached_switch_s": round(statistics.median(cached), 5),
                  "vae_swap_s": round(statistics.median(vae), 5),
                  "no_change_s": round(statistics.median(same), 5),
                  "ratio_cached_switch": round(statistics.median(cached) / cold_s, 4),
                  "ratio_vae_swap": round(statistics.median(vae) / cold_s, 4),
                  "switches": switches, "rss_mb": rss, "rss_growth_mb": round(rss[-1] - rss[0], 1) if rss else None,
                  "disk_loads_during_switches": 0}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if with_lora:
        from bench import lora_switch
        lora = lora_switch.run(lora_switch.BUILTIN, 20, 64, 4, device, dtype)
        result["lora"] = {k: lora[k] for k in ("cold_load_s", "switch_s", "adapter_select_s")}
        result["ratio_lora_switch"] = round(lora["switch_s"] / lora["cold_load_s"], 4)
    result["env"] = environment()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=100)
    parser.add_argument("--with-lora", action="store_true", help="also run bench/lora_switch.py (tiny-world)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true", help="append a table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    r = run(args.switches, device, dtype, args.with_lora)
    emit(r, args.out)
    if args.md:
        rows = [["cold checkpoint load", r["cold_load_s"], 1.0],
                ["checkpoint switch from RAM cache", r["cached_switch_s"], r["ratio_cached_switch"]],
                ["VAE swap", r["vae_swap_s"], r["ratio_vae_swap"]],
                ["nothing to change", r["no_change_s"], round(r["no_change_s"] / r["cold_load_s"], 4)]]
        if "lora" in r:
            rows.append(["LoRA switch (tiny-world, own cold load)", r["lora"]["switch_s"], r["ratio_lora_switch"]])
        table = markdown_table(["operation", "median s", "ratio to cold load"], rows)
        table += (f"\n\nRSS over {r['switches']} checkpoint+VAE switches (MB, every 10): {r['rss_mb']}; "
                  f"growth {r['rss_growth_mb']} MB; disk loads during the switches: 0")
        append_section("Switching", "python bench/switching.py " + " ".join(argv or sys.argv[1:]), r["env"], table)


if __name__ == "__main__":
    main()
