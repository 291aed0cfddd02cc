"""The list endpoints (`sd-models`, `samplers`, `loras`, ...) in A1111's shapes, from the
registry and the sampler tables. Functions of their inputs only, so each is testable alone.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from pipelines import samplers

SECRET_SETTINGS = ("auth", "api_auth", "auth_file")


def sd_models(registry: Any) -> list[dict[str, Any]]:
    out = []
    for entry in registry.checkpoints():
        sha256 = registry.cached_sha256(entry)
        out.append({"title": registry.title(entry), "model_name": entry.model_name,
                    "hash": sha256[:10] if sha256 else None, "sha256": sha256,
                    "filename": str(entry.path), "config": None})
    return out


def sd_vae(registry: Any) -> list[dict[str, Any]]:
    return [{"model_name": entry.name, "filename": str(entry.path)} for entry in registry.vaes()]


def loras(registry: Any) -> list[dict[str, Any]]:
    return [{"name": entry.stem, "alias": entry.metadata.get("ss_output_name") or entry.stem,
             "path": str(entry.path), "metadata": dict(entry.metadata)} for entry in registry.loras()]


def hypernetworks(registry: Any) -> list[dict[str, Any]]:
    return [{"name": entry.stem, "path": str(entry.path)} for entry in registry.hypernetworks()]


def embeddings(registry: Any) -> dict[str, Any]:
    """Every embedding file by name, with its vector width (`shape`) and count (`vectors`) read
    through the adapters lane's reader; files it cannot read are listed under `skipped`."""
    from pipelines.adapters.embeddings import read_embedding

    loaded, skipped = {}, {}
    for entry in registry.embeddings():
        item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        try:
            vectors = next(iter(read_embedding(entry.path).values()))
        except (OSError, ValueError, RuntimeError):
            skipped[entry.stem] = item
            continue
        loaded[entry.stem] = item | {"shape": int(vectors.shape[-1]), "vectors": int(vectors.shape[0])}
    return {"loaded": loaded, "skipped": skipped}


def sampler_list(table: samplers.SamplerTable | None = None) -> list[dict[str, Any]]:
    """Easel's samplers, then the extensions' (`table`, options naming the extension)."""
    out = []
    for spec in samplers.samplers():
        options = {k: v for k, v in spec.options.items() if isinstance(v, (str, int, float, bool))}
        out.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
    for extra in table.extra if table is not None else ():
        out.append({"name": extra.name, "aliases": [], "options": {"extension": extra.source}})
    return out


def scheduler_list() -> list[dict[str, Any]]:
    return [{"name": spec.name, "label": spec.label, "aliases": list(spec.aliases) or None,
             "default_rho": -1, "need_inner_model": False} for spec in samplers.schedules()]


def upscalers(models_dir: Path) -> list[dict[str, Any]]:
    """None, Lanczos, Nearest, then the upscaler model files (A1111 names them by stem)."""
    from pipelines import upscalers as up

    out = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
           for name in (up.NONE, *up.PIXEL_UPSCALERS)]
    out += [{"name": m.name, "model_name": m.folder, "model_path": str(m.path), "model_url": None, "scale": 4}
            for m in up.model_files(models_dir)]
    return out


def realesrgan_models(models_dir: Path) -> list[dict[str, Any]]:
    from pipelines import upscalers as up

    return [{"name": m.name, "path": str(m.path), "scale": 4} for m in up.model_files(models_dir)
            if m.folder == "RealESRGAN"]


def latent_upscale_modes() -> list[dict[str, Any]]:
    from pipelines import upscalers as up

    return [{"name": name} for name in up.LATENT_MODES]


def prompt_styles(prompts: Any) -> list[dict[str, Any]]:
    """data/styles.csv through the prompts lane's StyleStore (none when it is not wired)."""
    store = getattr(prompts, "styles", None)
    if store is None:
        return []
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in store.load()]


def cmd_flags(settings: Any) -> dict[str, Any]:
    """The start-up settings, passwords left out."""
    out = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in SECRET_SETTINGS:
            value = None if value is None else "***"
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def memory() -> dict[str, Any]:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "CUDA is not available"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(key: str) -> dict[str, int]:
        return {"current": stats.get(f"{key}.all.current", 0), "peak": stats.get(f"{key}.all.peak", 0)}

    return {"ram": ram, "cuda": {"system": {"free": free, "used": total - free, "total": total},
                                 "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
                                 "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
                                 "events": {"retries": stats.get("num_alloc_retries", 0),
                                            "oom": stats.get("num_ooms", 0)}}}
