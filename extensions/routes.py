"""Mount the REST routes extensions registered, under /ext/<name>/ on the app's FastAPI server,
behind the same login as the rest of the app.

No `from __future__ import annotations` here: FastAPI must see the guard's `Request` annotation
as a class, and it is imported inside the function."""
import logging
from typing import Any, Callable, Optional

log = logging.getLogger("easel.extensions")

Verify = Callable[[str, str], bool]  # (user, password) -> ok


def route_guard(fastapi_app: Any, verify: Optional[Verify]):
    """A FastAPI dependency for extension routes: open when the app has no login (no Gradio
    `auth` and no `verify`), else it takes a Gradio login (its session cookie, as the UI's own
    routes do) or HTTP Basic checked by `verify` (--api-auth users, else the --auth ones);
    anything else is 401. Returns the user name (None when open)."""
    from fastapi import HTTPException, Request

    from api.auth import decode_basic

    def ui_user(request: Request) -> Optional[str]:
        # Gradio keeps logged-in sessions in app.tokens, keyed by its access-token cookies.
        cookie_id = getattr(fastapi_app, "cookie_id", None)
        tokens = getattr(fastapi_app, "tokens", None) or {}
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = request.cookies.get(name)
            if token and token in tokens:
                return tokens[token]
        return None

    def guard(request: Request) -> Optional[str]:
        if getattr(fastapi_app, "auth", None) is None and verify is None:
            return None
        user = ui_user(request)
        if user is not None:
            return user
        given = decode_basic(request.headers.get("authorization") or "")
        if given is not None and verify is not None and verify(*given):
            return given[0]
        raise HTTPException(status_code=401, detail="log in to use this extension route",
                            headers={"WWW-Authenticate": "Basic"})

    return guard


def mount_extension_routes(fastapi_app: Any, extensions: Any, verify: Optional[Verify] = None) -> list[str]:
    """Add each route behind `route_guard`; returns the mounted paths. Routes go before
    Gradio's own catch-all routes, which would otherwise answer first."""
    from fastapi import Depends
    from fastapi.routing import APIRoute

    guard = Depends(route_guard(fastapi_app, verify))
    mounted = []
    for route in extensions.routes():
        api_route = APIRoute(route.path, route.endpoint, methods=list(route.methods), dependencies=[guard])
        fastapi_app.router.routes.insert(0, api_route)
        mounted.append(route.path)
        log.info("extension route %s %s", ",".join(route.methods), route.path)
    return mounted
