"""Extensions over REST: A1111's `GET /sdapi/v1/extensions` listing, and Easel's install /
update / enable / disable / uninstall routes. Changes apply the same access rule as the
Extensions tab (extensions.access): refused with 403 and the reason when the server listens
beyond loopback or shares without --enable-insecure-extension-access, or nobody is logged in."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import Depends, HTTPException
from pydantic import BaseModel

from extensions.actions import actions_for


class InstallRequest(BaseModel):
    url: str
    branch: Optional[str] = None
    commit: Optional[str] = None


class ActionResponse(BaseModel):
    message: str


def _do(action, *args) -> ActionResponse:
    try:
        return ActionResponse(message=action(*args))
    except PermissionError as exc:
        raise HTTPException(status_code=403, detail=str(exc)) from exc


def add_routes(router: Any, ctx: Any, authenticate) -> None:
    actions = actions_for(ctx)

    @router.get("/extensions")
    def extensions() -> list[dict[str, Any]]:
        """A1111's shape: name, remote, branch, commit_hash, version, enabled."""
        return [{"name": row.name, "remote": row.source_url, "branch": "", "commit_hash": row.commit,
                 "commit_date": 0, "version": row.version, "enabled": row.enabled, "builtin": row.builtin,
                 "status": row.status} for row in actions.rows()]

    @router.post("/extensions/install", response_model=ActionResponse)
    def install(payload: InstallRequest, user: Optional[str] = Depends(authenticate)):
        return _do(actions.install, payload.url, payload.branch, payload.commit, user)

    @router.post("/extensions/{name}/update", response_model=ActionResponse)
    def update(name: str, user: Optional[str] = Depends(authenticate)):
        return _do(actions.update, name, user)

    @router.post("/extensions/{name}/enable", response_model=ActionResponse)
    def enable(name: str, user: Optional[str] = Depends(authenticate)):
        return _do(actions.set_enabled, name, True, user)

    @router.post("/extensions/{name}/disable", response_model=ActionResponse)
    def disable(name: str, user: Optional[str] = Depends(authenticate)):
        return _do(actions.set_enabled, name, False, user)

    @router.post("/extensions/{name}/uninstall", response_model=ActionResponse)
    def uninstall(name: str, user: Optional[str] = Depends(authenticate)):
        return _do(actions.uninstall, name, user)
