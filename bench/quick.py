"""The two CPU checks of issue 10 in one command (under 5 minutes on a 2-core CPU): the
tiny-world engine-overhead ratio (Easel vs plain diffusers, target <= 1.03) and process memory
over 100 checkpoint+VAE switches (target: no growth). Prints one JSON object.

    python bench/quick.py [--repeats 5] [--switches 100] [--steps 20] [--out F]

It runs bench/overhead.py's and bench/switching.py's measurements with these settings and
prints both records (`overhead`, `switching`) under one object.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overhead, switching  # noqa: E402
from bench.common import emit, environment  # noqa: E402

import torch  # noqa: E402


def run(repeats: int, switches: int, steps: int) -> dict:
    device, dtype = torch.device("cpu"), torch.float32
    start = time.perf_counter()
    over = overhead.run("tinyworld", 64, steps, repeats, device, dtype)
    middle = time.perf_counter()
    switch = switching.run(switches, device, dtype, with_lora=False)
    end = time.perf_counter()
    return {"bench": "quick",
            "overhead": {key: value for key, value in over.items() if key != "env"},
            # the target is for the engine as users run it (previews on); previews off separately
            "overhead_target_met": over["ratio"] <= 1.03,
            "overhead_target_met_without_previews": over["ratio_no_preview"] <= 1.03,
            "switching": {key: value for key, value in switch.items() if key != "env"},
            "seconds": {"overhead": round(middle - start, 1), "switching": round(end - middle, 1),
                        "total": round(end - start, 1), "under_5_minutes": end - start < 300},
            "env": environment()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--switches", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    emit(run(args.repeats, args.switches, args.steps), args.out)


if __name__ == "__main__":
    main()
