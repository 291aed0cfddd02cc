"""Mount the REST routes extensions registered, under /ext/<name>/ on the app's FastAPI server."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("easel.extensions")


def mount_extension_routes(fastapi_app: Any, extensions: Any) -> list[str]:
    """Add each route; returns the mounted paths. Routes go before Gradio's own catch-all
    routes, which would otherwise answer first."""
    from fastapi.routing import APIRoute

    mounted = []
    for route in extensions.routes():
        api_route = APIRoute(route.path, route.endpoint, methods=list(route.methods))
        fastapi_app.router.routes.insert(0, api_route)
        mounted.append(route.path)
        log.info("extension route %s %s", ",".join(route.methods), route.path)
    return mounted
