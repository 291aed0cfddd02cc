"""The job queue as each user may see it: one's own jobs (admins: everyone's) and a cancel
button that stops only one's own jobs (admins may cancel all). Public API: `/queue`, `/cancel`."""
from __future__ import annotations

from typing import Any

import gradio as gr

from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.generation import owner_of

SCOPES = ("mine", "all")


def is_admin(ctx: AppContext, request: Any) -> bool:
    return bool(ctx.authenticator and ctx.authenticator.is_admin(getattr(request, "username", None)))


def queue_view(ctx: AppContext, request: Any) -> dict[str, Any]:
    admin = is_admin(ctx, request)
    return {"you": owner_of(request), "admin": admin,
            "jobs": ctx.jobs.view(owner_of(request), admin=admin)}


def cancel_jobs(ctx: AppContext, request: Any, scope: str) -> dict[str, Any]:
    if scope not in SCOPES:
        raise gr.Error(f"scope must be one of {', '.join(SCOPES)}, got '{scope}'", print_exception=False)
    if scope == "all":
        if not is_admin(ctx, request):
            raise gr.Error("only admins (marked @name in the auth file) can cancel other users' jobs",
                           print_exception=False)
        return {"cancelled": ctx.jobs.cancel_all()}
    return {"cancelled": ctx.jobs.cancel(owner_of(request))}


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    with gr.Accordion("Queue", open=False, elem_id="easel_queue"):
        reg.add("queue.view", gr.JSON(label="Your jobs (admins: all jobs)"))
        with gr.Row():
            reg.add("queue.refresh", gr.Button("Refresh", size="sm", elem_id="queue_refresh"))
            reg.add("queue.scope", gr.Radio(list(SCOPES), value="mine", label="Cancel", scale=2))
            reg.add("queue.cancel", gr.Button("Cancel jobs", size="sm", variant="stop", elem_id="queue_cancel"))

    def queue(request: gr.Request) -> dict[str, Any]:
        """Your waiting and running jobs with their queue position (admins see every job and its owner)."""
        return queue_view(ctx, request)

    def cancel(request: gr.Request, scope: str = "mine") -> dict[str, Any]:
        """Cancel your own jobs (scope "mine") or, for admins, every job (scope "all")."""
        return cancel_jobs(ctx, request, scope)

    reg["queue.refresh"].click(queue, outputs=[reg["queue.view"]], api_name="queue", queue=False)
    reg["queue.cancel"].click(cancel, inputs=[reg["queue.scope"]], outputs=[reg["queue.view"]],
                              api_name="cancel", queue=False)
