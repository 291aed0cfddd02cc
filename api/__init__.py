"""The A1111-compatible REST API (/sdapi/v1, /controlnet), mounted on the Gradio server by
`app.mount_rest_api` when Easel starts with --api."""
from __future__ import annotations

from typing import Any, Callable, Optional

from api.auth import dependency


def mount(app: Any, ctx: Any, verify: Optional[Callable[[str, str], bool]]) -> None:
    """Add the routes (and /docs, /openapi.json for them) to a running FastAPI app. Every
    route asks for HTTP Basic when `verify` (user, password -> ok; e.g. an
    `pipelines.access.Authenticator`) is given."""
    from fastapi import Depends
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.openapi.utils import get_openapi

    from api import controlnet, mapping, scripts
    from api.images import ImageLimits
    from api.options import ApiOptions
    from api.routes import build_router, checkpoint_loader

    authenticate = dependency(verify)
    options = ApiOptions(ctx.registry, ctx.settings.config_file, checkpoint_loader(ctx.manager))
    router = build_router(ctx, options, authenticate, verify)
    app.include_router(router)
    routers = [router]
    if scripts.controlnet_available(mapping.request_fields()):
        limits = ImageLimits.from_settings(ctx.settings, allow_urls=options.allow_urls)
        routers.append(controlnet.build_router(ctx, authenticate, limits))
        app.include_router(routers[-1])
    schema = {}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authenticate)])
    def openapi() -> dict:
        if not schema:
            schema.update(get_openapi(title="Easel A1111-compatible API", version="1.0",
                                      routes=[route for r in routers for route in r.routes]))
        return schema

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(authenticate)])
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Easel API")


__all__ = ["mount"]
