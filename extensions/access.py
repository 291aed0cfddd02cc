"""Who may install, update, uninstall or enable extensions: one rule for the UI and the REST API.

Installing an extension runs its code inside Easel, so on a server reachable from other machines
(--listen, --share) these actions are off unless --enable-insecure-extension-access is given, and
even then only for a logged-in user (A1111 locks the same actions behind the same flag).
"""
from __future__ import annotations

from typing import Any


def server_refusal(settings: Any) -> str | None:
    """The part of the rule that depends on how the server runs, not on who asks."""
    if not settings.remote_access:
        return None
    flags = " and ".join(f"--{flag}" for flag in ("listen", "share") if getattr(settings, flag))
    if not settings.extension_install_allowed:
        return (f"Installing, updating and removing extensions is disabled because Easel runs with "
                f"{flags}: an extension is code that runs on this machine. Restart with "
                f"--enable-insecure-extension-access (and --auth) to allow it for logged-in users.")
    if not (getattr(settings, "auth", None) or getattr(settings, "auth_file", None)):
        return (f"Extension changes need a logged-in user when Easel runs with {flags}: "
                f"add --auth or --auth-file.")
    return None


def extension_access_refusal(settings: Any, username: str | None) -> str | None:
    """None when allowed, else the reason to show next to the disabled buttons."""
    reason = server_refusal(settings)
    if reason is None and settings.remote_access and not username:
        return "Log in to install, update or remove extensions."
    return reason


def check_extension_access(settings: Any, username: str | None) -> None:
    """Raise PermissionError with the reason when the action is not allowed."""
    reason = extension_access_refusal(settings, username)
    if reason is not None:
        raise PermissionError(reason)
