"""What only admins may do over REST, and the routes that are Easel's own (not A1111's).

With logins (`--auth`/`--auth-file`, or `--api-auth`), changing what every user shares is for
admins (`@name` in the auth file): `POST /options` that changes the default checkpoint, VAE or
clip skip, `/unload-checkpoint`, `/reload-checkpoint`, and keeping a request's
`override_settings` afterwards (for others the override applies to their own request only).
Without logins there is one local user, who may do all of it, as in A1111. The rule itself is
`pipelines.access.shared_change_refusal`; refusals answer 403 with one line.

Routes added here: `POST /cancel-all` (admins: cancel every user's jobs) and `GET /history`
(your saved images from the history index; everyone's without logins)."""
from __future__ import annotations

from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, HTTPException, Query

from api.auth import owner
from pipelines.access import cancel_all_refusal, shared_change_refusal


def admin_gate(verify: Any) -> Callable[[Optional[str], str], None]:
    """`require(user, what)`: raises 403 unless `user` may change what everyone shares."""
    def require(user: Optional[str], what: str) -> None:
        refusal = shared_change_refusal(verify, user, what)
        if refusal:
            raise HTTPException(status_code=403, detail=refusal)
    return require


def may_change_shared(verify: Any, user: Optional[str]) -> bool:
    return shared_change_refusal(verify, user, "change shared settings") is None


def add_routes(router: APIRouter, ctx: Any, authenticate: Callable, verify: Any) -> None:
    @router.post("/cancel-all")
    def cancel_all(user: Optional[str] = Depends(authenticate)) -> dict[str, int]:
        """Admins only: interrupt the running job and cancel every waiting one, whoever owns them."""
        refusal = cancel_all_refusal(verify, user)
        if refusal:
            raise HTTPException(status_code=403, detail=refusal)
        return {"cancelled": ctx.jobs.cancel_all()}

    @router.get("/history")
    def history(limit: int = Query(100, ge=1, le=1000), user: Optional[str] = Depends(authenticate)) -> dict:
        """Your saved images, newest first (with logins: yours, made in the UI or here; without: all)."""
        index = getattr(ctx.outputs, "history", None)
        if index is None:
            return {"entries": []}
        entries = index.entries(owner=owner(user) if user else None, limit=limit)
        return {"entries": [index.public_entry(e) for e in entries]}
