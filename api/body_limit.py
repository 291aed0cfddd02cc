"""A cap on HTTP request bodies, for every route of the server (the REST API under /sdapi/v1
and /controlnet, Gradio's /gradio_api calls and uploads, the login form).

Without it a client can make the server read and parse any amount of JSON: FastAPI and Gradio
read the whole body into memory before anything checks it. The limit is
`Settings.request_body_limit()` (`--max-request-mb`; by default room for two base64 uploads of
`--max-upload-mb`). A body that declares a larger `Content-Length` is answered 413 before it is
read; a body without one (chunked) is counted as it arrives and refused once it passes the limit,
before the application sees any of it.

A plain ASGI middleware, so it runs for streaming requests too (Starlette's BaseHTTPMiddleware
would buffer). Installed through `launch(app_kwargs={"middleware": [...]})` because middleware
cannot be added to an app that is already serving.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def too_large_message(limit: int) -> str:
    return (f"the request body is above this server's limit of {limit / (1 << 20):g} MB "
            "(max_request_mb); send smaller images or fewer at once")


class BodyLimit:
    """ASGI middleware: 413 for request bodies above `max_bytes`."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("the request body limit must be at least 1 byte")
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        if declared is not None:
            await self.app(scope, _counting(receive, self.max_bytes), send)
            return
        # No Content-Length (chunked, or no body): read up to the limit before the app runs.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break  # http.disconnect: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": too_large_message(self.max_bytes)}).encode("utf-8")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode("ascii")),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _counting(receive: Receive, limit: int) -> Receive:
    """The server enforces Content-Length framing; this is a second line: past the limit the
    app sees the client as gone instead of more bytes."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return counted


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
