"""The A1111-compatible `/sdapi/v1` routes. Generation goes through the shared job queue (the
UI's progress shows API jobs and the reverse); a job belongs to its user (`api.auth.owner`),
so interrupt stops only that user's jobs."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Body, Depends, Query

from api import extension_routes, extras, listings, mapping, scripts
from api.images import ImageLimits, decode_image
from api.models import (EmbeddingsResponse, HypernetworkItem, Img2ImgRequest, ImageResponse,
                        LatentUpscalerModeItem, LoraItem, PNGInfoRequest, PNGInfoResponse,
                        ProgressResponse, PromptStyleItem, SamplerItem, SchedulerItem, ScriptsList,
                        SDModelItem, SDVaeItem, Txt2ImgRequest, UpscalerItem)
from api.admin import add_routes as add_admin_routes, admin_gate, may_change_shared
from api.auth import owner
from api.errors import JSONErrorRoute
from api.options import ApiOptions
from api.progress import ProgressTracker
from pipelines.additions import NO_ADDITIONS
from pipelines.metadata import parse_infotext, read_infotext, read_other_metadata
from pipelines.request import GenerationRequest

PREFIX = "/sdapi/v1"


def build_router(ctx: Any, options: ApiOptions, authenticate, verify: Any = None) -> APIRouter:
    """`verify`: the login check (an Authenticator: who is an admin); None when the API is open."""
    router = APIRouter(prefix=PREFIX, route_class=JSONErrorRoute, dependencies=[Depends(authenticate)],
                       tags=["sdapi"])
    tracker = ProgressTracker()
    require_admin = admin_gate(verify)  # api/admin.py: with logins, shared state is for admins
    limits = ImageLimits.from_settings(ctx.settings, allow_urls=options.allow_urls)
    additions = getattr(ctx, "additions", None) or NO_ADDITIONS  # the extensions' samplers

    def run(request: GenerationRequest, user: str):
        job = ctx.jobs.submit(request, owner(user))
        try:
            return job.result()
        finally:
            if not job.finished:
                job.cancel()

    def keep_overrides(payload, user) -> None:
        # Kept as the API-wide default only by those who may change shared state (admins when
        # there are logins); for anyone else the override applied to their own request alone.
        if payload.override_settings and not payload.override_settings_restore_afterwards \
                and may_change_shared(verify, user):
            options.apply(payload.override_settings, load=False)

    # --- generation --------------------------------------------------------------------------

    @router.post("/txt2img", response_model=ImageResponse)
    def txt2img(payload: Txt2ImgRequest, user: Optional[str] = Depends(authenticate)):
        payload = mapping.with_infotext(payload)
        request = mapping.txt2img_request(payload, options, limits, additions)
        result = run(request, user)
        keep_overrides(payload, user)
        return mapping.response(payload, request, result)

    @router.post("/img2img", response_model=ImageResponse)
    def img2img(payload: Img2ImgRequest, user: Optional[str] = Depends(authenticate)):
        payload = mapping.with_infotext(payload)
        request = mapping.img2img_request(payload, options, limits, additions)
        result = run(request, user)
        keep_overrides(payload, user)
        return mapping.response(payload, request, result)

    @router.post("/png-info", response_model=PNGInfoResponse)
    def png_info(payload: PNGInfoRequest):
        image = decode_image(payload.image, "image", limits)
        text = read_infotext(image) or ""
        items = {k: v for k, v in read_other_metadata(image).items()}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    extras.add_routes(router, ctx, limits)

    @router.post("/interrupt")
    def interrupt(user: Optional[str] = Depends(authenticate)) -> dict:
        ctx.jobs.cancel(owner(user))
        return {}

    @router.post("/skip")
    def skip(user: Optional[str] = Depends(authenticate)) -> dict:
        """Skip the image batch the caller's running job is sampling (it comes back decoded from
        where it stopped, as in A1111); the job goes on with its next batch."""
        ctx.jobs.skip(owner(user))
        return {}

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = Query(False), user: Optional[str] = Depends(authenticate)):
        # A logged-in caller sees only their own job (previews show prompts' pictures).
        return tracker.report(ctx.jobs, skip_current_image, viewer=owner(user) if user else None)

    # --- options and models ----------------------------------------------------------------

    @router.get("/options")
    def get_options() -> dict[str, Any]:
        return options.as_dict()

    @router.post("/options")
    def set_options(changes: dict[str, Any] = Body(...), user: Optional[str] = Depends(authenticate)) -> None:
        if options.pending(changes):  # posting the current values back (Open WebUI) is fine for anyone
            require_admin(user, "change the API's default checkpoint, VAE or clip skip")
        options.apply(changes)
        return None

    @router.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return listings.cmd_flags(ctx.settings)

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models():
        return listings.sd_models(ctx.registry)

    @router.get("/sd-vae", response_model=list[SDVaeItem])
    def sd_vae():
        return listings.sd_vae(ctx.registry)

    @router.get("/loras", response_model=list[LoraItem])
    def loras():
        return listings.loras(ctx.registry)

    @router.get("/embeddings", response_model=EmbeddingsResponse)
    def embeddings():
        return listings.embeddings(ctx.registry)

    @router.get("/hypernetworks", response_model=list[HypernetworkItem])
    def hypernetworks():
        return listings.hypernetworks(ctx.registry)

    for path in ("/refresh-checkpoints", "/refresh-vae", "/refresh-loras", "/refresh-embeddings"):
        @router.post(path, name=path.strip("/"))
        def refresh() -> None:
            ctx.registry.refresh()
            return None

    @router.post("/unload-checkpoint")
    def unload_checkpoint(user: Optional[str] = Depends(authenticate)) -> None:
        require_admin(user, "unload the checkpoint")
        ctx.manager.unload()
        return None

    @router.post("/reload-checkpoint")
    def reload_checkpoint(user: Optional[str] = Depends(authenticate)) -> None:
        require_admin(user, "reload the checkpoint")
        checkpoint_loader(ctx.manager)(options.checkpoint().name, options.vae)
        return None

    @router.get("/samplers", response_model=list[SamplerItem])
    def samplers_list():
        return listings.sampler_list(additions.samplers)

    @router.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers_list():
        return listings.scheduler_list()

    @router.get("/upscalers", response_model=list[UpscalerItem])
    def upscalers():
        return listings.upscalers(ctx.settings.models_root)

    @router.get("/realesrgan-models")
    def realesrgan_models() -> list[dict[str, Any]]:
        return listings.realesrgan_models(ctx.settings.models_root)

    @router.get("/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        return []  # GFPGAN / CodeFormer are not part of Easel

    @router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem])
    def latent_upscale_modes():
        return listings.latent_upscale_modes()

    @router.get("/prompt-styles", response_model=list[PromptStyleItem])
    def prompt_styles():
        return listings.prompt_styles(getattr(ctx, "prompts", None))

    @router.get("/scripts", response_model=ScriptsList)
    def scripts_list():
        return scripts.script_names(mapping.request_fields())

    @router.get("/script-info")
    def script_info() -> list[dict[str, Any]]:
        return scripts.script_info(mapping.request_fields(), int(getattr(ctx.settings, "control_net_unit_count", 3)))

    extension_routes.add_routes(router, ctx, authenticate)
    add_admin_routes(router, ctx, authenticate, verify)  # /cancel-all, /history

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return listings.memory()

    return router


def checkpoint_loader(manager: Any):
    """Load a checkpoint (+ VAE) now, as A1111 does inside POST /options. It goes through the
    manager's lock, which a generation holds from its first step to its last decode: asked for
    while a job runs, the load waits for that job and never swaps a model under it."""
    def load(checkpoint: str, vae: Optional[str]) -> None:
        with manager.pipeline("txt2img", checkpoint, vae):
            pass
    return load
