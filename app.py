"""Easel entry point: flags -> Settings -> engine -> UI -> launch.

Only the offline switch is imported at the top: HF_HUB_OFFLINE must be set before anything
imports huggingface_hub (diffusers, transformers, gradio), so those are imported inside functions.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.offline import configure_environment

PROJECT_ROOT = Path(__file__).resolve().parent
PRESETS_DIR = PROJECT_ROOT / "presets"
BUILTIN_EXTENSIONS_DIR = PROJECT_ROOT / "extensions" / "builtin"  # == extensions.loader.BUILTIN_DIR
_TRUE = ("1", "true", "yes", "on")
log = logging.getLogger("easel")


def build_context(settings):
    """The engine, wired once: registry (scanned, headers only), manager, job queue, outputs.
    Nothing is loaded onto a device here; the first generation loads its model."""
    from pipelines.cache import ModelCache
    from pipelines.devices import resolve_device, resolve_dtype
    from pipelines.generate import generate
    from pipelines.prompts.source import PromptSource
    from pipelines.hashing import HashCache
    from pipelines.jobs import JobQueue
    from pipelines.limits import RequestLimits
    from pipelines.manager import PipelineManager
    from pipelines.optimizations import Optimizations
    from pipelines.registry import ModelRegistry
    from ui.context import AppContext
    from ui.presets import load_presets

    prepare_data_dirs(settings)
    registry = ModelRegistry(settings.paths(), HashCache(settings.cache_file))
    registry.refresh()
    device = resolve_device(settings.device)
    manager = PipelineManager(registry, ModelCache(settings.ram_cache_bytes()), device,
                              resolve_dtype(settings.precision, device),
                              optimizations=Optimizations.from_settings(settings),
                              memory=memory_options(settings), lora_max_resident=settings.lora_max_resident,
                              lora_fuse=settings.lora_fuse)
    outputs = open_outputs(settings)
    extensions = load_app_extensions(settings)
    prompts = PromptSource.for_data_dir(settings.data_dir,  # styles.csv + wildcards/
                                        sdxl_clip_l_skip=settings.sdxl_clip_l_skip)
    hooks = extensions.hooks()

    def run(request, progress, cancel):
        # The worker runs one job at a time: the current job is this request's, and its owner
        # is recorded with every image it saves (the history index, "my results").
        job = jobs.current()
        return generate(manager, outputs.for_owner(job.owner if job is not None else None), request, progress,
                        cancel, hooks=hooks, prompts=prompts)

    jobs = JobQueue(run, max_queued_per_user=settings.max_queued_per_user,
                    admit=RequestLimits.from_settings(settings))
    return AppContext(settings=settings, registry=registry, manager=manager, jobs=jobs,
                      outputs=outputs, presets=load_presets(PRESETS_DIR), authenticator=authenticator(settings),
                      extensions=extensions, prompts=prompts, additions=extensions.additions())


def open_outputs(settings):
    """The outputs folder as the app starts it: temporary files of a save that was killed are
    swept, and the history index (data/history.json) is loaded, or rebuilt from the images."""
    from pipelines.history import INDEX_NAME, HistoryIndex
    from pipelines.outputs import OutputStore

    outputs = OutputStore(settings.outputs_dir, history=HistoryIndex(settings.data_dir / INDEX_NAME,
                                                                     settings.outputs_dir))
    outputs.recover()
    return outputs


def memory_options(settings):
    from pipelines.memory import MemoryOptions

    mode = "lowvram" if settings.lowvram else "medvram" if settings.medvram else "normal"
    return MemoryOptions(mode=mode, vae_tile_above_pixels=settings.vae_tile_above_pixels)


def load_app_extensions(settings):
    """Built-in and user extensions; one that fails is listed with its error, never fatal."""
    from extensions.loader import load_extensions
    from extensions.state import ExtensionState

    state = ExtensionState(settings.data_dir)
    return load_extensions(BUILTIN_EXTENSIONS_DIR, settings.extensions_dir, state.disabled(),
                           state.setting_values())


def start_extensions(fastapi_app, ctx) -> None:
    """After launch: mount extension routes under /ext/<name>/ (behind the UI login or the
    API's HTTP Basic users, like every other route), then app_started hooks."""
    from extensions.routes import mount_extension_routes

    mount_extension_routes(fastapi_app, ctx.extensions, api_authenticator(ctx.settings, ctx.authenticator))
    ctx.extensions.hooks().app_started(fastapi_app)


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
    settings.extensions_dir.mkdir(parents=True, exist_ok=True)


def authenticator(settings):
    """Gradio's `auth=` callable over --auth and --auth-file users (see pipelines/access.py);
    None when nobody is listed (no login)."""
    from pipelines.access import Authenticator, load_users

    users = load_users(settings.auth, settings.auth_file)
    return Authenticator(users) if users else None


def launch_options(settings, auth=None) -> dict[str, Any]:
    from starlette.middleware import Middleware

    from api.body_limit import BodyLimit
    from pipelines.access import served_paths
    from ui.layout import launch_style

    allowed, blocked = served_paths(settings)
    return {
        "server_name": "0.0.0.0" if settings.listen else "127.0.0.1",
        "server_port": settings.port,
        "share": bool(settings.share),
        "auth": auth if auth is not None else authenticator(settings),
        # Gallery results are the saved files under outputs/ (their PNG keeps the infotext).
        "allowed_paths": allowed,
        "blocked_paths": blocked,
        "max_file_size": int(settings.max_upload_mb * (1 << 20)),
        # Queued generation events wait in worker threads (ui/generation.DEVICE_EVENT_SLOTS of them).
        "max_threads": 100,
        "show_error": True,
        # The REST API serves its own /openapi.json and /docs (behind its auth). Request bodies
        # are capped for every route (413), before FastAPI or Gradio read them into memory.
        "app_kwargs": {"openapi_url": None,
                       "middleware": [Middleware(BodyLimit, max_bytes=settings.request_body_limit())]},
        **launch_style(),
    }


def api_authenticator(settings, ui_authenticator=None):
    """Who may use the REST API: --api-auth users when given (same syntax as --auth, hashed
    passwords and @admins included), else the UI's login; None: the API is open. With no @admin
    among the --api-auth users, all of them are admins: in A1111 the API login is the operator's,
    and clients (Open WebUI, webuiapi) set the model with it."""
    from dataclasses import replace

    from pipelines.access import Authenticator, parse_credentials

    if settings.api_auth:
        users = parse_credentials(settings.api_auth.split(","), "--api-auth")
        if not any(user.admin for user in users):
            users = [replace(user, admin=True) for user in users]
        return Authenticator(users)
    return ui_authenticator if ui_authenticator is not None else authenticator(settings)


def mount_rest_api(fastapi_app, ctx, api_auth=None) -> None:
    """The A1111-compatible REST API on the same server, behind HTTP Basic when `api_auth`."""
    import api

    api.mount(fastapi_app, ctx, api_auth)
    log.info("REST API at /sdapi/v1 (docs at /docs)%s", ", HTTP Basic" if api_auth else "")


def restart_process(blocks, delay_s: float = 1.0) -> None:
    """The Extensions tab's Restart: answer the click, close the server, then start this same
    command again in this process (sockets are not inherited across exec)."""
    import threading

    def again() -> None:
        blocks.close()
        os.execv(sys.executable, sys.orig_argv)

    threading.Timer(delay_s, again).start()


def online_requested(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Read before Settings exists, so the offline switch is set before any HF import."""
    return "--online" in argv or environ.get("EASEL_ONLINE", "").lower() in _TRUE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    online = online_requested(argv, os.environ)
    configure_environment(online=online)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipelines.settings import Settings

    from pipelines.access import check_launch, launch_report, load_users

    try:
        settings = Settings.from_sources(argv)
        users = load_users(settings.auth, settings.auth_file)
        for warning in check_launch(settings, users).warnings:
            log.warning(warning)
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
        options = launch_options(settings, ctx.authenticator)
        api_auth = api_authenticator(settings, ctx.authenticator) if settings.api else None
    except ValueError as exc:
        print(f"easel: {exc}", file=sys.stderr)
        return 2
    ctx.restart = functools.partial(restart_process, blocks)
    fastapi_app, local_url, share_url = blocks.launch(prevent_thread_lock=True, **options)
    for line in launch_report(settings, users, local_url, share_url):
        print(f"easel: {line}", flush=True)
    if settings.api:
        mount_rest_api(fastapi_app, ctx, api_auth)
    start_extensions(fastapi_app, ctx)
    try:
        blocks.block_thread()
    finally:
        ctx.jobs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
