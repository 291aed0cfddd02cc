"""HTTP Basic for every REST route. The check is the login's own (`pipelines.access.
Authenticator`: constant-time compare, hashed passwords, the same work for unknown names).
With no login configured the API is open, and an empty `Authorization` header (Open WebUI
sends one) is simply ignored."""
from __future__ import annotations

import base64
import binascii
from typing import Callable, Optional

from fastapi import HTTPException, Request

Verify = Callable[[str, str], bool]  # (user, password) -> ok
ANONYMOUS = None


def _unauthorized() -> HTTPException:
    return HTTPException(status_code=401, detail="Incorrect username or password",
                         headers={"WWW-Authenticate": "Basic"})


def decode_basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def check(verify: Optional[Verify], header: str | None) -> str | None:
    """The user name the header proves (None when the API is open), or HTTPException 401."""
    if verify is None:
        return ANONYMOUS
    given = decode_basic(header or "")
    if given is None or not verify(*given):
        raise _unauthorized()
    return given[0]


def dependency(verify: Optional[Verify]):
    """A FastAPI dependency returning the authenticated user name (None when open)."""
    def authenticate(request: Request) -> str | None:
        return check(verify, request.headers.get("authorization"))

    return authenticate


def owner(user: str | None) -> str:
    """The job owner: a logged-in API user is the same user as in the UI (so either side can
    interrupt the other's jobs of that user); without a login, all API callers share one."""
    return f"user:{user}" if user else "api:anonymous"
