"""Errors as JSON with a 4xx status, whatever the app's own exception handlers are (the API is
mounted on Gradio's already-running app, whose handlers cannot change any more): bad input,
unknown names and unusable models are 422 with one specific line; anything else is a 500 with
one line, logged in full."""
from __future__ import annotations

import logging
from typing import Any, Callable

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

log = logging.getLogger("easel.api")
MAX_MESSAGE = 400


def _one_line(text: str) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 1] + "…"


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        parts.append(f"{location}: {error.get('msg', 'invalid')}{got}")
    return _one_line("; ".join(parts) or "the request body is not valid")


def error_body(kind: str, message: str) -> dict[str, Any]:
    # A1111's error shape (`error`, `detail`, `errors`), one line each.
    return {"error": kind, "detail": message, "errors": message}


class JSONErrorRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except HTTPException:
                raise  # 401 and friends: Starlette's own handler answers them
            except RequestValidationError as exc:
                return JSONResponse(error_body("ValidationError", validation_message(exc)), status_code=422)
            except ValueError as exc:
                message = _one_line(str(exc) or type(exc).__name__)
                log.info("API refused %s: %s", request.url.path, message)
                return JSONResponse(error_body(type(exc).__name__, message), status_code=422)
            except Exception as exc:  # noqa: BLE001 - the server keeps serving, the client gets one line
                log.error("API %s failed", request.url.path, exc_info=exc)
                message = _one_line(f"{type(exc).__name__}: {exc}")
                return JSONResponse(error_body(type(exc).__name__, message), status_code=500)

        return handle
