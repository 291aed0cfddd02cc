"""Find extension folders, check their manifests, import them and call `register(api)`.

Built-ins first, then the user's folder; a user extension never replaces a built-in of the
same name. Every failure (bad manifest, API version, import error, register raising) is kept on
the extension's record for the Extensions tab and the app starts anyway.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from extensions.api import ExtensionAPI, Registrations, Route
from extensions.hooks import ExtensionHooks
from extensions.manifest import Manifest, read_manifest

log = logging.getLogger("easel.extensions")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"  # shipped with Easel
ENTRY_FILE = "__init__.py"  # an extension folder is a Python package exposing register(api)
MAX_HOOK_ERRORS = 20


@dataclass
class ExtensionRecord:
    name: str
    path: Path
    builtin: bool
    manifest: Manifest | None = None
    enabled: bool = True
    loaded: bool = False
    load_time_s: float | None = None
    error: str | None = None  # why it is not loaded
    hook_errors: list[str] = field(default_factory=list)
    registered: Registrations = field(default_factory=Registrations)

    @property
    def version(self) -> str:
        return self.manifest.version if self.manifest else ""

    def record_hook_error(self, hook: str, exc: BaseException) -> None:
        self.hook_errors.append(f"{hook}: {type(exc).__name__}: {exc}")
        del self.hook_errors[:-MAX_HOOK_ERRORS]


class ExtensionSet:
    """The extensions of one app run, and what they registered."""

    def __init__(self, records: list[ExtensionRecord]) -> None:
        self.records = records

    def loaded(self) -> list[ExtensionRecord]:
        return [r for r in self.records if r.loaded]

    def find(self, name: str) -> ExtensionRecord | None:
        return next((r for r in self.records if r.name == name), None)

    def hooks(self) -> ExtensionHooks:
        entries, fields = [], []
        for record in self.loaded():
            for hook, fns in record.registered.hooks.items():
                entries += [(record.name, hook, fn) for fn in fns]
            fields += [(record.name, key, fn) for key, fn in record.registered.infotext_fields]
        return ExtensionHooks(entries, fields, on_error=self._record_error)

    def _record_error(self, name: str, hook: str, exc: BaseException) -> None:
        record = self.find(name)
        if record is not None:
            record.record_hook_error(hook, exc)

    def tabs(self) -> list[tuple[ExtensionRecord, str, Any]]:
        return [(r, title, build) for r in self.loaded() for title, build in r.registered.tabs]

    def accordions(self, tab: str) -> list[tuple[ExtensionRecord, str, Any]]:
        return [(r, title, build) for r in self.loaded()
                for where, title, build in r.registered.accordions if where == tab]

    def routes(self) -> list[Route]:
        return [route for r in self.loaded() for route in r.registered.routes]

    def samplers(self) -> dict[str, Any]:
        return {name: fn for r in self.loaded() for name, fn in r.registered.samplers.items()}

    def preprocessors(self) -> dict[str, Any]:
        return {name: fn for r in self.loaded() for name, fn in r.registered.preprocessors.items()}

    def additions(self):
        """The loaded extensions' samplers and preprocessors as the engine's tables
        (pipelines.additions.EngineAdditions). A name a previous extension already added is
        left out and recorded as that extension's error."""
        from pipelines.additions import EngineAdditions
        from pipelines.control.preprocessors import PreprocessorTable, extension_preprocessor
        from pipelines.samplers import ExtraSampler, SamplerTable

        extra_samplers, extra_preprocessors = [], []
        for record in self.loaded():
            for name, make in record.registered.samplers.items():
                if any(s.name.casefold() == name.casefold() for s in extra_samplers):
                    _taken(record, f"sampler '{name}'")
                    continue
                extra_samplers.append(ExtraSampler(name, make, record.name))
            for name, fn in record.registered.preprocessors.items():
                if any(p.name == name for p in extra_preprocessors):
                    _taken(record, f"preprocessor '{name}'")
                    continue
                extra_preprocessors.append(extension_preprocessor(name, fn, record.name))
        return EngineAdditions(SamplerTable(tuple(extra_samplers)), PreprocessorTable(tuple(extra_preprocessors)))


def _taken(record: ExtensionRecord, what: str) -> None:
    error = ValueError("another extension added it first; this one is left out")
    if f"{what}: ValueError: {error}" in record.hook_errors:
        return  # additions() built again: reported once
    log.error("extension '%s': %s: %s", record.name, what, error)
    record.record_hook_error(what, error)


def discover(folder: Path, builtin: bool) -> list[ExtensionRecord]:
    """One record per sub-folder (hidden folders and files skipped), manifest read, nothing imported."""
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        record = ExtensionRecord(name=path.name, path=path, builtin=builtin)
        try:
            record.manifest = read_manifest(path)
            record.name = record.manifest.name
        except ValueError as exc:
            record.error = str(exc)
        records.append(record)
    return records


def load_extensions(builtin_dir: Path, user_dir: Path, disabled: set[str] = frozenset(),
                    setting_values: Mapping[str, Mapping[str, Any]] | None = None) -> ExtensionSet:
    setting_values = setting_values or {}
    records = discover(builtin_dir, builtin=True) + discover(user_dir, builtin=False)
    seen: set[str] = set()
    for record in records:
        if record.error:
            log.error("extension folder %s: %s", record.path, record.error)
            continue
        if record.name in seen:
            record.error = f"another extension named '{record.name}' is already loaded (built-ins win)"
            log.error("extension %s: %s", record.path, record.error)
            continue
        seen.add(record.name)
        if record.name in disabled:
            record.enabled = False
            continue
        if not record.manifest.api_compatible:
            record.error = record.manifest.api_mismatch_message()
            log.error(record.error)
            continue
        _load_one(record, setting_values.get(record.name, {}))
    return ExtensionSet(records)


def _load_one(record: ExtensionRecord, setting_values: Mapping[str, Any]) -> None:
    started = time.perf_counter()
    api = ExtensionAPI(record.name, setting_values)
    module_name = "easel_ext_" + record.name.replace("-", "_")
    for stale in [m for m in sys.modules if m == module_name or m.startswith(module_name + ".")]:
        del sys.modules[stale]  # a reinstalled or updated extension must not see old submodules
    try:
        entry = record.path / ENTRY_FILE
        if not entry.is_file():
            raise ImportError(f"no {ENTRY_FILE} with a register(api) function")
        spec = importlib.util.spec_from_file_location(module_name, entry,
                                                      submodule_search_locations=[str(record.path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # relative imports inside the package need it
        spec.loader.exec_module(module)
        register = getattr(module, "register", None)
        if not callable(register):
            raise ImportError(f"{ENTRY_FILE} has no register(api) function")
        register(api)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        record.error = f"{type(exc).__name__}: {exc}"
        log.error("extension '%s' failed to load; the app goes on without it\n%s", record.name,
                  "".join(traceback.format_exception(exc)).rstrip())
        return
    finally:
        api.close()
        record.load_time_s = time.perf_counter() - started
    record.registered = api.registered
    record.loaded = True
    log.info("extension '%s' %s loaded in %.2f s", record.name, record.version, record.load_time_s)
