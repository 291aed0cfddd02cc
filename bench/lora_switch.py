"""LoRA switch time against a cold checkpoint load, through the real PipelineManager.

    python bench/lora_switch.py [--checkpoint PATH] [--switches 30] [--out result.json]

Without --checkpoint it uses the built-in tiny-world model. Three random LoRAs sized for the
checkpoint's layers (kohya format, rank 8) are written to a temporary models folder. Measured:
- cold_load_s: a fresh manager's first request for the checkpoint (disk -> RAM -> device);
- lora_first_load_s: the first request that uses a new LoRA (file -> resident adapter);
- switch_s: median request set-up while switching among the 3 resident LoRAs (weights vary);
- no_change_s: median request set-up with nothing to change (the per-request floor);
- adapter_select_s: the LoRA stack's own share of a switch (set_adapters on resident adapters);
- step timings for the same generation with no LoRA, the LoRA applied, and the LoRA fused.
Prints one JSON object (and writes it to --out). ratio = cold_load_s / switch_s.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.offline import configure_environment  # noqa: E402

configure_environment()

import torch  # noqa: E402

from pipelines.adapters.lora_stack import LoraRequest  # noqa: E402
from pipelines.cache import ModelCache  # noqa: E402
from pipelines.hashing import HashCache  # noqa: E402
from pipelines.manager import PipelineManager  # noqa: E402
from pipelines.registry import ModelPaths, ModelRegistry  # noqa: E402
from tests import factories  # noqa: E402

BUILTIN = ROOT / "assets" / "tinyworld" / "tinyworld.safetensors"


def _manager(root: Path, device: torch.device, dtype: torch.dtype) -> PipelineManager:
    paths = ModelPaths(models_dir=root / "models", embeddings_dir=root / "embeddings",
                       builtin_dir=root / "no-builtin")
    registry = ModelRegistry(paths, HashCache(root / "cache.json"))
    registry.refresh()
    return PipelineManager(registry, ModelCache(64 << 30), device, dtype)


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _enter(manager: PipelineManager, checkpoint: str, loras=()) -> None:
    with manager.pipeline("txt2img", checkpoint, loras=tuple(loras)):
        pass


def _generate_s(manager, checkpoint, loras, size, steps, fuse=False) -> float:
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    request = GenerationRequest(prompt="a red square on a blue background", checkpoint=checkpoint, width=size,
                                height=size, steps=steps, seed=1, save_images=False,
                                negative_prompt="" if not loras else "")
    prompt = request.prompt + "".join(f"<lora:{r.name}:{r.unet_weight}>" for r in loras)
    request = request.with_changes(prompt=prompt)
    manager.loras.fuse = fuse
    try:
        generate(manager, None, request)  # warm-up (first LoRA load, caches)
        return statistics.median(_timed(lambda: generate(manager, None, request)) for _ in range(3))
    finally:
        manager.loras.fuse = False


def run(checkpoint: Path, switches: int, size: int, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    root = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    try:
        models = root / "models"
        (models / "Stable-diffusion").mkdir(parents=True)
        (root / "embeddings").mkdir()
        target = models / "Stable-diffusion" / checkpoint.name
        target.symlink_to(checkpoint.resolve())

        cold = []
        for _ in range(3):  # the first run also pays the OS page cache; report both
            manager = _manager(root, device, dtype)
            cold.append(_timed(lambda: _enter(manager, checkpoint.name)))
            assert manager.load_counts["checkpoint"] == 1

        with manager.pipeline("txt2img", checkpoint.name) as active:
            components = {"unet": active.pipe.unet, "text_encoder": active.pipe.text_encoder}
            for seed, name in enumerate(("a", "b", "c")):
                factories.write_tiny_lora(models / "Lora" / f"bench-{name}.safetensors", seed=seed, rank=8,
                                          alpha=4.0, scale=0.05, components=components,
                                          metadata={})  # no base tag: the keys and widths decide
        manager.registry.refresh()
        names = ["bench-a", "bench-b", "bench-c"]
        first_loads = [_timed(lambda n=n: _enter(manager, checkpoint.name, [LoraRequest(n, 1.0, 1.0)]))
                       for n in names]
        _enter(manager, checkpoint.name, [LoraRequest(n) for n in names])  # all resident
        loads_before = dict(manager.load_counts)
        switch = [_timed(lambda i=i: _enter(manager, checkpoint.name,
                                             [LoraRequest(names[i % 3], 0.5 + (i % 4) / 4, 1.0)]))
                  for i in range(switches)]
        same = [_timed(lambda: _enter(manager, checkpoint.name, [LoraRequest(names[0], 1.0, 1.0)]))
                for _ in range(switches)]
        with manager.pipeline("txt2img", checkpoint.name) as active:  # the stack's own share
            def select(i):
                request = [LoraRequest(names[i % 3], 0.5 + (i % 4) / 4, 1.0)]
                with manager.loras.activate(active.pipe, active.arch, checkpoint.name, request):
                    pass
            select_only = [_timed(lambda i=i: select(i)) for i in range(switches)]
        loads_after = dict(manager.load_counts)
        assert loads_after == loads_before, "a switch reloaded something"

        one = [LoraRequest(names[0], 1.0, 1.0)]
        generation = {"no_lora_s": _generate_s(manager, checkpoint.name, [], size, steps),
                      "lora_applied_s": _generate_s(manager, checkpoint.name, one, size, steps),
                      "lora_fused_s": _generate_s(manager, checkpoint.name, one, size, steps, fuse=True)}
        switch_s = statistics.median(switch)
        return {
            "checkpoint": checkpoint.name, "checkpoint_bytes": checkpoint.stat().st_size,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "cold_load_s": round(statistics.median(cold[1:]), 4), "cold_load_first_s": round(cold[0], 4),
            "lora_first_load_s": round(statistics.median(first_loads), 4),
            "switch_s": round(switch_s, 4), "switch_p90_s": round(sorted(switch)[int(0.9 * len(switch)) - 1], 4),
            "no_change_s": round(statistics.median(same), 4),
            "adapter_select_s": round(statistics.median(select_only), 5),
            "ratio_cold_load_to_switch": round(statistics.median(cold[1:]) / switch_s, 1),
            "ratio_cold_load_to_adapter_select": round(statistics.median(cold[1:]) / statistics.median(select_only), 1),
            # counted, not assumed: the manager's one cold load, and none added by the switches
            "switches": switches, "checkpoint_loads": manager.load_counts["checkpoint"],
            "checkpoint_loads_during_switches": loads_after["checkpoint"] - loads_before["checkpoint"],
            "generation": {"size": size, "steps": steps, **{k: round(v, 4) for k, v in generation.items()}},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=BUILTIN)
    parser.add_argument("--switches", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    result = run(args.checkpoint, args.switches, args.size, args.steps, device, dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
