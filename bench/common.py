"""Shared helpers for the bench scripts: a manager over a temporary models folder, timing that
waits for the GPU, process memory, the machine/versions record, and BENCHMARKS.md tables."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.offline import configure_environment  # noqa: E402

configure_environment()

import torch  # noqa: E402

BUILTIN = ROOT / "assets" / "tinyworld" / "tinyworld.safetensors"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def make_manager(root: Path, device: torch.device, dtype: torch.dtype, ram_bytes: int = 16 << 30,
                 optimizations=None):
    """A PipelineManager over `root/models` (A1111 layout) with its own hash cache."""
    from pipelines.cache import ModelCache
    from pipelines.hashing import HashCache
    from pipelines.manager import PipelineManager
    from pipelines.registry import ModelPaths, ModelRegistry

    paths = ModelPaths(models_dir=root / "models", embeddings_dir=root / "embeddings",
                       builtin_dir=root / "no-builtin")
    registry = ModelRegistry(paths, HashCache(root / "cache.json"))
    registry.refresh()
    extra = {} if optimizations is None else {"optimizations": optimizations}
    return PipelineManager(registry, ModelCache(ram_bytes), device, dtype, **extra)


def models_folder(root: Path) -> Path:
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "models" / "VAE").mkdir(parents=True, exist_ok=True)
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    return folder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def rss_bytes() -> int:
    """Resident set size of this process (psutil when present, else /proc)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def environment() -> dict[str, Any]:
    """Device, versions and load: recorded with every number."""
    import diffusers
    import transformers

    info = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def emit(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_section(title: str, command: str, env: dict, table: str, notes: str = "") -> None:
    """Append one measured table to BENCHMARKS.md with the command and machine that made it."""
    machine = ", ".join(f"{k} {v}" for k, v in env.items())
    block = f"\n### {title}\n\n`{command}`  \n{machine}\n\n{table}\n"
    if notes:
        block += f"\n{notes}\n"
    with BENCHMARKS_MD.open("a", encoding="utf-8") as f:
        f.write(block)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two uint8-range images (arrays or PIL)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0 ** 2 / mse))


def ssim(a, b) -> float:
    """Structural similarity (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) of two
    RGB images, on the luma channel; 1.0 = identical."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    def luma(image):
        rgb = np.asarray(image, dtype=np.float64)
        return rgb @ np.array([0.299, 0.587, 0.114]) if rgb.ndim == 3 else rgb

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(value.mean())
