"""Extensions tab: what is installed and loaded, and install / update / enable / disable /
uninstall / requirements / index search / restart. Every change goes through ExtensionActions,
which applies the access rule; when changes are not allowed the buttons are disabled and the
tab says why."""
from __future__ import annotations

from typing import Any

import gradio as gr

from extensions.actions import TABLE_HEADERS, ExtensionActions, actions_for
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.errors import user_error

INDEX_HEADERS = ["name", "description", "tags", "URL", "installed"]


def username_of(request: Any) -> str | None:
    return getattr(request, "username", None) or None


def run_action(action, *args) -> str:
    """Call an ExtensionActions method; refusals and bad input become a short UI error."""
    try:
        return action(*args)
    except PermissionError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    except Exception as exc:
        raise user_error(exc) from exc


def table(actions: ExtensionActions) -> list[list]:
    return [row.as_list() for row in actions.rows()]


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    if ctx.extensions is None:
        return
    actions = actions_for(ctx)
    refusal = actions.server_refusal()  # the handlers check the user as well
    can_change = refusal is None
    with gr.Tab("Extensions", id="extensions") as tab:
        reg.add("extensions.access", gr.Markdown(_access_text(refusal), elem_id="extensions_access"))
        reg.add("extensions.table", gr.Dataframe(table(actions), headers=TABLE_HEADERS, interactive=False,
                                                 wrap=True, elem_id="extensions_table"))
        with gr.Row():
            reg.add("extensions.name", gr.Dropdown(actions.names(), label="Extension", allow_custom_value=True,
                                                   elem_id="extensions_name", scale=3))
            reg.add("extensions.refresh", gr.Button("Refresh list", scale=1))
        buttons = {}
        with gr.Row():
            for key, label in (("check", "Check for updates"), ("update", "Update"), ("enable", "Enable"),
                               ("disable", "Disable"), ("uninstall", "Uninstall"),
                               ("restart", "Restart Easel")):
                buttons[key] = reg.add(f"extensions.{key}", gr.Button(
                    label, interactive=can_change, variant="stop" if key == "uninstall" else "secondary",
                    elem_id=f"extensions_{key}"))
        with gr.Accordion("Install from a git URL, a folder or a .zip", open=True):
            with gr.Row():
                reg.add("extensions.source", gr.Textbox(label="git URL, folder or .zip path", scale=4,
                                                        elem_id="extensions_source"))
                reg.add("extensions.branch", gr.Textbox(label="Branch (optional)", scale=1))
                reg.add("extensions.commit", gr.Textbox(label="Commit (optional)", scale=1))
            buttons["install"] = reg.add("extensions.install", gr.Button(
                "Install", variant="primary", interactive=can_change, elem_id="extensions_install"))
            gr.Markdown("Installing copies files only: Easel never runs an extension's install scripts. "
                        "Its Python requirements are listed below and installed only when you confirm.")
        with gr.Accordion("Requirements of the selected extension", open=False):
            reg.add("extensions.requirements", gr.Textbox(label="Declared requirements (missing ones marked)",
                                                          lines=3, interactive=False))
            reg.add("extensions.trust", gr.Checkbox(False, label="I trust these packages: pip may run their setup code"))
            buttons["requirements"] = reg.add("extensions.install_requirements", gr.Button(
                "Install requirements", interactive=can_change))
        with gr.Accordion("Extension index", open=False):
            with gr.Row():
                reg.add("extensions.index", gr.Textbox(label="Index JSON: path or http(s) URL", scale=3))
                reg.add("extensions.query", gr.Textbox(label="Search", scale=2))
            buttons["search"] = reg.add("extensions.search", gr.Button("Load and search", interactive=can_change))
            reg.add("extensions.results", gr.Dataframe(headers=INDEX_HEADERS, interactive=False, wrap=True))
            with gr.Row():
                reg.add("extensions.index_name", gr.Textbox(label="Name to install from the index", scale=3))
                buttons["index_install"] = reg.add("extensions.index_install", gr.Button(
                    "Install from index", interactive=can_change, scale=1))
        reg.add("extensions.message", gr.Markdown("", elem_id="extensions_message"))
    _wire(actions, reg, buttons, tab)


def _access_text(refusal: str | None) -> str:
    if refusal is None:
        return "Extensions run with Easel's rights on this machine: install only what you trust."
    return f"**Extension changes are disabled.** {refusal}"


# --- handlers (module level so tests call exactly what the buttons call) ---------------------

def install_handler(actions: ExtensionActions, source: str, branch: str, commit: str, request: Any) -> str:
    return run_action(actions.install, source, branch, commit, username_of(request))


def set_enabled_handler(actions: ExtensionActions, name: str, enabled: bool, request: Any) -> str:
    return run_action(actions.set_enabled, name, enabled, username_of(request))


def uninstall_handler(actions: ExtensionActions, name: str, request: Any) -> str:
    return run_action(actions.uninstall, name, username_of(request))


def requirements_text(actions: ExtensionActions, name: str) -> str:
    if not name:
        return ""
    try:
        declared, missing = actions.requirements_of(name)
    except ValueError as exc:
        return str(exc)
    if not declared:
        return "(none declared)"
    return "\n".join(f"{r}{'   <- missing' if r in missing else ''}" for r in declared)


def _wire(actions: ExtensionActions, reg: ComponentRegistry, buttons: dict, tab: Any) -> None:
    private = dict(api_visibility="private")
    message, name = reg["extensions.message"], reg["extensions.name"]

    def refreshed(text: str):
        return text, table(actions), gr.update(choices=actions.names())

    outputs = [message, reg["extensions.table"], name]

    def on_install(source, branch, commit, request: gr.Request):
        return refreshed(install_handler(actions, source, branch, commit, request))

    def on_check(ext, request: gr.Request):
        return refreshed(run_action(actions.check_update, ext, username_of(request)))

    def on_update(ext, request: gr.Request):
        return refreshed(run_action(actions.update, ext, username_of(request)))

    def on_enable(ext, request: gr.Request):
        return refreshed(set_enabled_handler(actions, ext, True, request))

    def on_disable(ext, request: gr.Request):
        return refreshed(set_enabled_handler(actions, ext, False, request))

    def on_uninstall(ext, request: gr.Request):
        return refreshed(uninstall_handler(actions, ext, request))

    def on_requirements(ext, trusted, request: gr.Request):
        return run_action(actions.install_requirements, ext, bool(trusted), username_of(request))

    def on_search(location, query, request: gr.Request):
        return run_action(actions.search_index, location, query, username_of(request))

    def on_index_install(location, ext, request: gr.Request):
        return refreshed(run_action(actions.install_from_index, location, ext, username_of(request)))

    def on_restart(request: gr.Request):
        return run_action(actions.restart, username_of(request))

    source = reg.many("extensions.source", "extensions.branch", "extensions.commit")
    buttons["install"].click(on_install, inputs=source, outputs=outputs, **private)
    buttons["check"].click(on_check, inputs=[name], outputs=outputs, **private)
    buttons["update"].click(on_update, inputs=[name], outputs=outputs, **private)
    buttons["enable"].click(on_enable, inputs=[name], outputs=outputs, **private)
    buttons["disable"].click(on_disable, inputs=[name], outputs=outputs, **private)
    buttons["uninstall"].click(on_uninstall, inputs=[name], outputs=outputs, **private)
    buttons["requirements"].click(on_requirements, inputs=[name, reg["extensions.trust"]], outputs=[message], **private)
    buttons["search"].click(on_search, inputs=reg.many("extensions.index", "extensions.query"),
                            outputs=[reg["extensions.results"]], **private)
    buttons["index_install"].click(on_index_install, inputs=reg.many("extensions.index", "extensions.index_name"),
                                   outputs=outputs, **private)
    buttons["restart"].click(on_restart, outputs=[message], **private)
    for trigger in (reg["extensions.refresh"].click, tab.select):  # what is on disk now
        trigger(lambda: refreshed(""), outputs=outputs, **private, queue=False)
    name.change(lambda ext: requirements_text(actions, ext), inputs=[name],
                outputs=[reg["extensions.requirements"]], **private, queue=False)
