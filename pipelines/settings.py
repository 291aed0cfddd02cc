"""Settings: defaults < data/config.json < environment (EASEL_*) < command line.

Each key is validated on its own so one bad value in config.json names itself instead of
stopping the app with a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.registry import ModelPaths

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_MODELS_DIR = PROJECT_ROOT / "assets" / "tinyworld"

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Settings:
    data_dir: Path = PROJECT_ROOT / "data"
    models_dir: Path | None = None  # default: data_dir/models
    embeddings_dir: Path | None = None  # default: data_dir/embeddings
    device: str = "auto"
    precision: str = "auto"
    ram_cache_gb: float = 4.0
    online: bool = False
    port: int = 7860
    listen: bool = False
    share: bool = False
    auth: str | None = None
    auth_file: Path | None = None
    api: bool = False
    # Exposure and limits (pipelines/access.py, pipelines/limits.py).
    enable_insecure_extension_access: bool = False
    max_queued_per_user: int = 4
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_images: int = 16  # batch_count x batch_size
    max_upload_mb: float = 25.0
    max_upload_pixels: int = 4096 * 4096
    max_request_mb: float | None = None  # largest HTTP body; None: two base64 uploads + 1 MB
    api_auth: str | None = None  # user:pass[,u2:p2] for the REST API; default: --auth
    lora_max_resident: int = 8  # LoRAs kept loaded per checkpoint (least recently used leaves first)
    lora_fuse: bool = False  # merge active LoRAs into the weights per request (unmerged after)
    fast: bool = False  # fast mode: channels_last + fused QKV (pipelines/optimizations.py)
    fast_compile: bool = False  # fast mode plus regional torch.compile of the UNet
    fast_compile_mode: str = "default"  # "reduce-overhead": CUDA graphs (whole UNet, CUDA only)
    fast_compile_backend: str = "inductor"  # "aot_eager"/"eager": Dynamo without code generation
    fast_lora_rank: int = 128  # with --fast-compile: LoRAs padded to this rank for hot-swapping
    deepcache: int = 0  # DeepCache: full UNet every N steps (0: off; pipelines/accelerators.py)
    tomesd: float = 0.0  # token merging ratio in self-attention (0: off)
    medvram: bool = False  # model CPU offload (pipelines/memory.py)
    lowvram: bool = False  # sequential CPU offload
    vae_tile_above_pixels: int = 1536 * 1536  # VAE tiling+slicing past this many pixels; 0: never
    control_net_unit_count: int = 3  # ControlNet units in the UI (the A1111 extension's option name)
    sdxl_clip_l_skip: bool = False  # A1111 "Clip skip SDXL": on SDXL, clip skip applies to CLIP-L only

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device '{self.device}' is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.ram_cache_gb <= 4096:
            raise ValueError(f"ram_cache_gb must be between 0 and 4096, got {self.ram_cache_gb}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if self.auth is not None and ":" not in self.auth:
            raise ValueError("auth must look like user:password (several separated by commas)")
        if self.api_auth is not None and ":" not in self.api_auth:
            raise ValueError("api_auth must look like user:password (several separated by commas)")
        for name in ("max_queued_per_user", "max_width", "max_height", "max_steps", "max_batch_images",
                     "max_upload_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.lora_max_resident <= 1000:
            raise ValueError(f"lora_max_resident must be between 1 and 1000, got {self.lora_max_resident}")
        if not 1 <= self.control_net_unit_count <= 10:
            raise ValueError(f"control_net_unit_count must be between 1 and 10, got {self.control_net_unit_count}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be above 0, got {self.max_upload_mb}")
        if self.max_request_mb is not None and not self.max_request_mb > 0:
            raise ValueError(f"max_request_mb must be above 0, got {self.max_request_mb}")

    def request_body_limit(self) -> int:
        """Bytes an HTTP request body may have (api/body_limit.py): --max-request-mb, else room
        for two uploads of --max-upload-mb as base64 (an init image and its mask) plus 1 MB."""
        if self.max_request_mb is not None:
            return int(self.max_request_mb * (1 << 20))
        return int(self.max_upload_mb * (1 << 20) * 4 / 3 * 2) + (1 << 20)

    # Reachable from other machines: the login rules and the extension lock apply.
    @property
    def remote_access(self) -> bool:
        return bool(self.listen or self.share)

    @property
    def extension_install_allowed(self) -> bool:
        """The one switch the extension installer reads (A1111's disable_extension_access)."""
        return not self.remote_access or self.enable_insecure_extension_access

    # Derived paths: one place decides where things live inside the data dir.
    @property
    def models_root(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def embeddings_root(self) -> Path:
        return self.embeddings_dir or self.data_dir / "embeddings"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def extensions_dir(self) -> Path:
        return self.data_dir / "extensions"

    @property
    def cache_file(self) -> Path:
        return self.data_dir / "cache.json"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.json"

    def paths(self) -> ModelPaths:
        return ModelPaths(models_dir=self.models_root, embeddings_dir=self.embeddings_root,
                          builtin_dir=BUILTIN_MODELS_DIR)

    def ram_cache_bytes(self) -> int:
        return int(self.ram_cache_gb * (1 << 30))

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        cli = vars(build_arg_parser().parse_args(argv))
        data_dir = Path(cli.get("data_dir") or environ.get("EASEL_DATA_DIR") or cls.data_dir)
        values: dict[str, Any] = {}
        values.update(_read_config_file(data_dir / "config.json"))
        values.update(_from_environ(environ))
        values.update({k: v for k, v in cli.items() if v is not None})
        values["data_dir"] = data_dir
        return cls(**_coerce(values))

    def with_overrides(self, **changes: Any) -> "Settings":
        return replace(self, **_coerce(changes))


_FIELD_TYPES = {"data_dir": Path, "models_dir": Path, "embeddings_dir": Path, "auth_file": Path,
                "ram_cache_gb": float, "port": int, "online": bool, "listen": bool,
                "share": bool, "api": bool, "device": str, "precision": str, "auth": str,
                "enable_insecure_extension_access": bool, "max_queued_per_user": int, "max_width": int,
                "max_height": int, "max_steps": int, "max_batch_images": int, "max_upload_mb": float,
                "max_upload_pixels": int, "max_request_mb": float, "api_auth": str, "control_net_unit_count": int,
                "fast": bool, "fast_compile": bool, "medvram": bool, "lowvram": bool,
                "fast_compile_mode": str, "fast_compile_backend": str, "fast_lora_rank": int,
                "deepcache": int, "tomesd": float,
                "lora_max_resident": int, "lora_fuse": bool,
                "vae_tile_above_pixels": int, "sdxl_clip_l_skip": bool}


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            continue  # config.json also holds UI options that are not start-up settings
        kind = _FIELD_TYPES[key]
        if value is None:
            out[key] = None
        elif kind is bool:
            out[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        else:
            try:
                out[key] = kind(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"setting '{key}': cannot read {value!r} as {kind.__name__}") from exc
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    return data if isinstance(data, dict) else {}


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for f in fields(Settings):
        key = "EASEL_" + f.name.upper()
        if key in environ:
            out[f.name] = environ[key]
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    """Every flag defaults to None so that 'not given' can be told from 'given the default'."""
    p = argparse.ArgumentParser(prog="easel", description="Easel: a web studio for Stable Diffusion")
    p.add_argument("--port", type=int)
    p.add_argument("--listen", action="store_true", default=None, help="bind 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--share", action="store_true", default=None, help="create a public Gradio share link")
    p.add_argument("--auth", help="user:pass[,user2:pass2]")
    p.add_argument("--auth-file", dest="auth_file", help="file with user:pass lines")
    p.add_argument("--api", action="store_true", default=None, help="enable the A1111-compatible REST API")
    p.add_argument("--api-auth", dest="api_auth", help="user:pass[,user2:pass2] for the REST API (default: --auth)")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--models-dir", dest="models_dir", help="an A1111 models/ folder to use as is")
    p.add_argument("--embeddings-dir", dest="embeddings_dir")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--ram-cache-gb", dest="ram_cache_gb", type=float)
    p.add_argument("--online", action="store_true", default=None,
                   help="allow Hugging Face downloads (off by default)")
    p.add_argument("--enable-insecure-extension-access", dest="enable_insecure_extension_access",
                   action="store_true", default=None,
                   help="allow installing extensions (arbitrary code) with --listen/--share, for logged-in users only")
    p.add_argument("--max-queued-per-user", dest="max_queued_per_user", type=int)
    for name in ("max_width", "max_height", "max_steps", "max_batch_images", "max_upload_pixels"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    p.add_argument("--max-upload-mb", dest="max_upload_mb", type=float)
    p.add_argument("--max-request-mb", dest="max_request_mb", type=float,
                   help="largest HTTP request body in MB (default: room for two base64 uploads)")
    p.add_argument("--fast", action="store_true", default=None,
                   help="fast mode: channels_last + fused QKV projections (same images, faster on GPUs)")
    p.add_argument("--medvram", action="store_true", default=None,
                   help="model CPU offload: each model on the GPU only while it runs (less VRAM, slower)")
    p.add_argument("--lowvram", action="store_true", default=None,
                   help="sequential CPU offload, layer by layer (least VRAM, much slower)")
    p.add_argument("--lora-max-resident", dest="lora_max_resident", type=int,
                   help="LoRAs kept loaded per checkpoint for instant switching (default 8)")
    p.add_argument("--lora-fuse", dest="lora_fuse", action="store_true", default=None,
                   help="merge the active LoRAs into the weights for each request (faster sampling, same image)")
    p.add_argument("--vae-tile-above-pixels", dest="vae_tile_above_pixels", type=int,
                   help="decode images larger than this many pixels with a tiled VAE (0: never)")
    p.add_argument("--fast-compile", dest="fast_compile", action="store_true", default=None,
                   help="fast mode plus torch.compile of the UNet's repeated blocks (first image per size compiles)")
    p.add_argument("--fast-compile-mode", dest="fast_compile_mode",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode for --fast-compile; reduce-overhead = CUDA graphs (CUDA only)")
    p.add_argument("--fast-compile-backend", dest="fast_compile_backend",
                   choices=("inductor", "aot_eager", "eager", "cudagraphs"), help="torch.compile backend (default inductor)")
    p.add_argument("--fast-lora-rank", dest="fast_lora_rank", type=int,
                   help="with --fast-compile: largest LoRA rank to expect; LoRAs are padded to it so hot-swaps do not recompile")
    p.add_argument("--deepcache", dest="deepcache", type=int, metavar="N",
                   help="DeepCache: run the full UNet every N steps, reuse its deep features in between (off: 0)")
    p.add_argument("--tomesd", dest="tomesd", type=float, metavar="RATIO",
                   help="token merging: merge this share of tokens in self-attention, e.g. 0.5 (off: 0)")
    return p
