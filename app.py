"""Easel entry point: flags -> Settings -> engine -> UI -> launch.

Only the offline switch is imported at the top: HF_HUB_OFFLINE must be set before anything
imports huggingface_hub (diffusers, transformers, gradio), so those are imported inside functions.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.offline import configure_environment

PROJECT_ROOT = Path(__file__).resolve().parent
PRESETS_DIR = PROJECT_ROOT / "presets"
_TRUE = ("1", "true", "yes", "on")
log = logging.getLogger("easel")


def build_context(settings):
    """The engine, wired once: registry (scanned, headers only), manager, job queue, outputs.
    Nothing is loaded onto a device here; the first generation loads its model."""
    import functools

    from pipelines.cache import ModelCache
    from pipelines.devices import resolve_device, resolve_dtype
    from pipelines.generate import generate
    from pipelines.hashing import HashCache
    from pipelines.jobs import JobQueue
    from pipelines.manager import PipelineManager
    from pipelines.outputs import OutputStore
    from pipelines.registry import ModelRegistry
    from ui.context import AppContext
    from ui.presets import load_presets

    prepare_data_dirs(settings)
    registry = ModelRegistry(settings.paths(), HashCache(settings.cache_file))
    registry.refresh()
    device = resolve_device(settings.device)
    manager = PipelineManager(registry, ModelCache(settings.ram_cache_bytes()), device,
                              resolve_dtype(settings.precision, device))
    outputs = OutputStore(settings.outputs_dir)
    jobs = JobQueue(functools.partial(generate, manager, outputs))
    return AppContext(settings=settings, registry=registry, manager=manager, jobs=jobs,
                      outputs=outputs, presets=load_presets(PRESETS_DIR))


def build_app(settings):
    """(gr.Blocks, AppContext) without launching; only the data dir's folders are created."""
    from ui.layout import build_ui

    ctx = build_context(settings)
    blocks, _components = build_ui(ctx)
    return blocks, ctx


def prepare_data_dirs(settings) -> None:
    """Create our own data folders. Folders given with --models-dir / --embeddings-dir (an
    A1111 install, say) are read as they are, never written to."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.outputs_dir.mkdir(parents=True, exist_ok=True)
    if settings.models_dir is None:
        for name in ("Stable-diffusion", "VAE", "Lora"):
            (settings.models_root / name).mkdir(parents=True, exist_ok=True)
    if settings.embeddings_dir is None:
        settings.embeddings_root.mkdir(parents=True, exist_ok=True)


def auth_credentials(settings) -> list[tuple[str, str]] | None:
    """--auth "u:p,u2:p2" plus --auth-file (one or more user:pass per line, commas allowed)."""
    entries: list[str] = []
    if settings.auth:
        entries += settings.auth.split(",")
    if settings.auth_file:
        try:
            text = Path(settings.auth_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --auth-file {settings.auth_file}: {exc.strerror}") from exc
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entries += line.split(",")
    credentials = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"credentials must look like user:password, got '{user}{sep}…'")
        credentials.append((user, password))
    return credentials or None


def launch_options(settings) -> dict[str, Any]:
    from ui.layout import launch_style

    return {
        "server_name": "0.0.0.0" if settings.listen else "127.0.0.1",
        "server_port": settings.port,
        "share": bool(settings.share),
        "auth": auth_credentials(settings),
        # Gallery results are the saved files under outputs/ (their PNG keeps the infotext).
        "allowed_paths": [str(settings.outputs_dir)],
        "show_error": True,
        **launch_style(),
    }


def mount_rest_api(fastapi_app, ctx) -> None:
    """Where the A1111-compatible /sdapi/v1 routes mount (a later issue); --api is a flag
    until then."""
    log.warning("--api: the REST API is not part of this version yet; only the Gradio API is served")


def online_requested(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Read before Settings exists, so the offline switch is set before any HF import."""
    return "--online" in argv or environ.get("EASEL_ONLINE", "").lower() in _TRUE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    online = online_requested(argv, os.environ)
    configure_environment(online=online)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipelines.settings import Settings

    try:
        settings = Settings.from_sources(argv)
        if settings.online and not online:  # "online": true in config.json
            if "huggingface_hub" in sys.modules:
                log.warning("online mode from config.json comes too late; pass --online instead")
            else:
                configure_environment(online=True)
        # Gradio keeps uploads and served files in GRADIO_TEMP_DIR (default /tmp/gradio); keep
        # them inside the data dir with everything else we write. Read when Blocks is created.
        gradio_tmp = settings.data_dir / "tmp" / "gradio"
        gradio_tmp.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("GRADIO_TEMP_DIR", str(gradio_tmp))
        blocks, ctx = build_app(settings)
        options = launch_options(settings)
    except ValueError as exc:
        print(f"easel: {exc}", file=sys.stderr)
        return 2
    fastapi_app, local_url, _share_url = blocks.launch(prevent_thread_lock=True, **options)
    if settings.api:
        mount_rest_api(fastapi_app, ctx)
    try:
        blocks.block_thread()
    finally:
        ctx.jobs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
