"""What the Extensions tab (and, later, a REST route) can do, with the access rule applied to
every change. No Gradio here: handlers are thin, and tests call these directly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from extensions import index as ext_index
from extensions.access import check_extension_access, extension_access_refusal, server_refusal
from extensions.installer import Installer, git_info, install_requirements, missing_requirements
from extensions.loader import ExtensionRecord, ExtensionSet, discover
from extensions.state import ExtensionState

TABLE_HEADERS = ["name", "version", "enabled", "kind", "source URL", "commit", "load time (s)", "status"]


@dataclass(frozen=True)
class ExtensionRow:
    name: str
    version: str
    enabled: bool
    builtin: bool
    source_url: str
    commit: str
    load_time_s: float | None
    status: str

    def as_list(self) -> list:
        return [self.name, self.version, self.enabled, "built-in" if self.builtin else "user",
                self.source_url, self.commit[:8], "" if self.load_time_s is None else round(self.load_time_s, 3),
                self.status]


class ExtensionActions:
    def __init__(self, settings: Any, extensions: ExtensionSet, builtin_dir: Path,
                 restart: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.extensions = extensions
        self.builtin_dir = Path(builtin_dir)
        self.user_dir = Path(settings.extensions_dir)
        self.state = ExtensionState(settings.data_dir)
        self.installer = Installer(self.user_dir, [r.name for r in discover(self.builtin_dir, True)])
        self._restart = restart

    # --- reading ---------------------------------------------------------------------------------

    def refusal(self, username: str | None) -> str | None:
        return extension_access_refusal(self.settings, username)

    def server_refusal(self) -> str | None:
        """Whether changes are possible at all on this server (decides the buttons' state)."""
        return server_refusal(self.settings)

    def rows(self) -> list[ExtensionRow]:
        """What is on disk now, with what this run loaded (install/enable apply at restart)."""
        disabled = self.state.disabled()
        rows = []
        for found in discover(self.builtin_dir, True) + discover(self.user_dir, False):
            running = next((r for r in self.extensions.records if r.path == found.path), None)
            info = git_info(found.path) if not found.builtin else None
            rows.append(ExtensionRow(
                name=found.name, version=found.version, enabled=found.name not in disabled,
                builtin=found.builtin, source_url=(info.remote or "") if info else "",
                commit=(info.commit or "") if info else "",
                load_time_s=running.load_time_s if running else None,
                status=_status(found, running, found.name not in disabled)))
        return rows

    def names(self) -> list[str]:
        return [row.name for row in self.rows()]

    def requirements_of(self, name: str) -> tuple[list[str], list[str]]:
        """(declared, missing from this environment)."""
        record = self._on_disk(name)
        declared = list(record.manifest.requirements) if record.manifest else []
        return declared, missing_requirements(declared)

    # --- changing (each checks access first) ---------------------------------------------------

    def install(self, source: str, branch: str | None, commit: str | None, username: str | None) -> str:
        check_extension_access(self.settings, username)
        result = self.installer.install(source, branch or None, commit or None)
        lines = [f"Installed **{result.name}** {result.manifest.version}"
                 + (f" at {result.commit[:8]}" if result.commit else "") + ". Restart Easel to load it."]
        if not result.manifest.api_compatible:
            lines.append(f"**Warning:** {result.manifest.api_mismatch_message()}. It stays installed "
                         f"but will not load.")
        if result.skipped_scripts:
            lines.append(f"It contains {', '.join(result.skipped_scripts)}, which Easel does not run: "
                         f"read it before running it yourself.")
        missing = missing_requirements(result.requirements)
        if missing:
            lines.append(f"It needs Python packages that are not installed: {', '.join(missing)}. "
                         f"Review them, then use 'Install requirements'.")
        return "\n\n".join(lines)

    def install_from_index(self, location: str, name: str, username: str | None) -> str:
        check_extension_access(self.settings, username)
        entry = next((e for e in ext_index.read_index(location) if e.name == name), None)
        if entry is None:
            raise ValueError(f"'{name}' is not in the index; search again and pick a listed name")
        return self.install(entry.url, entry.branch, None, username)

    def search_index(self, location: str, query: str, username: str | None) -> list[list[str]]:
        check_extension_access(self.settings, username)  # the server would fetch a URL for the user
        installed = set(self.names())
        return [[e.name, e.description, ", ".join(e.tags), e.url, "installed" if e.name in installed else ""]
                for e in ext_index.search_index(ext_index.read_index(location), query)]

    def check_update(self, name: str, username: str | None) -> str:
        check_extension_access(self.settings, username)
        status = self.installer.check_update(name)
        return f"{name}: {status.message}"

    def update(self, name: str, username: str | None) -> str:
        check_extension_access(self.settings, username)
        message = f"{name}: {self.installer.update(name).message}"
        manifest = self._on_disk(name).manifest
        if manifest is not None and not manifest.api_compatible:
            message += f"\n\n**Warning:** {manifest.api_mismatch_message()}. It will not load."
        return message

    def set_enabled(self, name: str, enabled: bool, username: str | None) -> str:
        check_extension_access(self.settings, username)
        self._on_disk(name)
        self.state.set_enabled(name, enabled)
        return f"{name} {'enabled' if enabled else 'disabled'}; restart Easel to apply"

    def uninstall(self, name: str, username: str | None) -> str:
        check_extension_access(self.settings, username)
        self.installer.uninstall(name)
        self.state.forget(name)
        return f"{name} removed; restart Easel to unload it"

    def install_requirements(self, name: str, confirmed: bool, username: str | None, run=None) -> str:
        check_extension_access(self.settings, username)
        _declared, missing = self.requirements_of(name)
        kwargs = {"run": run} if run is not None else {}
        return install_requirements(missing, confirmed, **kwargs)

    def restart(self, username: str | None) -> str:
        check_extension_access(self.settings, username)
        if self._restart is None:
            return "This Easel was not started by its launcher: stop it and start it again."
        self._restart()
        return "Restarting… reload the page in a few seconds."

    def _on_disk(self, name: str) -> ExtensionRecord:
        for record in discover(self.builtin_dir, True) + discover(self.user_dir, False):
            if record.name == name:
                return record
        raise ValueError(f"no extension named '{name}'")


def actions_for(ctx: Any) -> ExtensionActions:
    """The actions over an AppContext (the UI tab and the REST routes use the same)."""
    from extensions.loader import BUILTIN_DIR

    loaded = getattr(ctx, "extensions", None) or ExtensionSet([])
    return ExtensionActions(ctx.settings, loaded, BUILTIN_DIR, restart=getattr(ctx, "restart", None))


def _status(found: ExtensionRecord, running: ExtensionRecord | None, enabled: bool) -> str:
    if found.error:
        return f"error: {found.error}"
    if running is None:
        return "installed; restart to load" if enabled else "disabled"
    if running.error:
        return f"error: {running.error}"
    if not running.loaded:
        return "disabled" if not enabled else "enabled; restart to load"
    status = "loaded" if enabled else "loaded; disabled at next restart"
    if running.version != found.version:
        status += f" ({running.version}; restart to run {found.version})"
    if running.hook_errors:
        status += f"; {len(running.hook_errors)} hook error(s), last: {running.hook_errors[-1]}"
    return status
