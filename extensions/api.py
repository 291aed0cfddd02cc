"""The object an extension's `register(api)` receives: the whole API an extension may use.

One instance per extension, so everything it adds is attributed to it (errors name it, routes
live under /ext/<name>/). After `register` returns the object is closed: an extension cannot
add hooks later from a thread or a callback, which keeps what is loaded what the tab lists.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from extensions.manifest import API_VERSION

HOOK_NAMES = ("before_generate", "on_step", "after_image", "image_saved", "model_loaded", "app_started")
FORM_TABS = ("txt2img", "img2img")
_ROUTE_PATH = re.compile(r"^[A-Za-z0-9_\-./{}]*$")
_HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")


@dataclass(frozen=True)
class SettingSpec:
    key: str
    default: Any
    description: str = ""


@dataclass(frozen=True)
class Route:
    path: str  # full path: /ext/<name>/<sub path>
    endpoint: Callable[..., Any]
    methods: tuple[str, ...]


@dataclass
class Registrations:
    """Everything one extension registered, in order."""
    tabs: list[tuple[str, Callable]] = field(default_factory=list)
    accordions: list[tuple[str, str, Callable]] = field(default_factory=list)  # (tab, title, build)
    hooks: dict[str, list[Callable]] = field(default_factory=dict)
    samplers: dict[str, Callable] = field(default_factory=dict)
    preprocessors: dict[str, Callable] = field(default_factory=dict)
    infotext_fields: list[tuple[str, Callable]] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    settings: dict[str, SettingSpec] = field(default_factory=dict)


class ExtensionAPI:
    api_version = API_VERSION

    def __init__(self, name: str, setting_values: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.log = logging.getLogger(f"easel.ext.{name}")
        self.registered = Registrations()
        self._setting_values = dict(setting_values or {})
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"extension '{self.name}': register things inside register(api) only")

    # --- UI ------------------------------------------------------------------------------------

    def add_tab(self, title: str, build: Callable[[Any], None]) -> None:
        """A top-level tab; `build(ui)` creates Gradio components inside it (ui: ExtensionUI)."""
        self._check_open()
        self.registered.tabs.append((str(title), build))

    def add_accordion(self, tab: str, title: str, build: Callable[[Any], None]) -> None:
        """An accordion under the txt2img or img2img settings column; `build(ui)` fills it."""
        self._check_open()
        if tab not in FORM_TABS:
            raise ValueError(f"accordions go in one of {', '.join(FORM_TABS)}, not '{tab}'")
        self.registered.accordions.append((tab, str(title), build))

    # --- hooks -----------------------------------------------------------------------------------

    def on(self, hook: str, fn: Callable | None = None):
        """Add a hook (see HOOK_NAMES); usable as `api.on("after_image", fn)` or as a decorator."""
        self._check_open()
        if hook not in HOOK_NAMES:
            raise ValueError(f"unknown hook '{hook}': use one of {', '.join(HOOK_NAMES)}")
        if fn is None:
            return lambda f: self.on(hook, f)
        self.registered.hooks.setdefault(hook, []).append(fn)
        return fn

    # --- engine additions --------------------------------------------------------------------

    def add_sampler(self, name: str, make_scheduler: Callable[[dict], Any]) -> None:
        """A sampler in every sampler menu, the API and X/Y/Z: `make_scheduler(base_config) ->
        diffusers scheduler`, called for each request with the checkpoint's scheduler config."""
        from pipelines.samplers import check_extra_sampler_name

        self._check_open()
        check_extra_sampler_name(str(name))
        if not callable(make_scheduler):
            raise ValueError(f"sampler '{name}': make_scheduler must be callable")
        self.registered.samplers[str(name)] = make_scheduler

    def add_preprocessor(self, name: str, fn: Callable[..., Any]) -> None:
        """A ControlNet preprocessor: `fn(image: PIL RGB) -> PIL image` (or an HxWx3 uint8 array),
        offered in the unit menus, /controlnet/module_list and /controlnet/detect."""
        from pipelines.control.preprocessors import extension_preprocessor

        self._check_open()
        if not callable(fn):
            raise ValueError(f"preprocessor '{name}': fn must be callable")
        extension_preprocessor(str(name), fn, self.name)  # checks the name
        self.registered.preprocessors[str(name).strip().lower()] = fn

    def add_infotext_field(self, key: str, value: Callable[[Any], Any]) -> None:
        """`value(request)` -> what to write after `key:` in the infotext (None: leave it out)."""
        self._check_open()
        if not key or any(c in key for c in ",:\n"):
            raise ValueError(f"infotext key {key!r} must be non-empty without ',', ':' or newlines")
        self.registered.infotext_fields.append((key, value))

    def add_route(self, path: str, endpoint: Callable[..., Any], methods: tuple[str, ...] = ("GET",)) -> str:
        """A FastAPI route at /ext/<name>/<path>; returns the full path."""
        self._check_open()
        path = path.strip("/")
        if not _ROUTE_PATH.match(path) or ".." in path:
            raise ValueError(f"route path {path!r}: use letters, digits, '-', '_', '.', '/' and {{params}}")
        methods = tuple(m.upper() for m in methods)
        bad = [m for m in methods if m not in _HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown HTTP method(s) {', '.join(bad)}")
        full = f"/ext/{self.name}/{path}".rstrip("/")
        self.registered.routes.append(Route(full, endpoint, methods))
        return full

    # --- settings ------------------------------------------------------------------------------

    def declare_setting(self, key: str, default: Any, description: str = "") -> None:
        """A setting the user may change under "extensions": {"<name>": {...}} in config.json."""
        self._check_open()
        self.registered.settings[key] = SettingSpec(key, default, description)

    def setting(self, key: str) -> Any:
        spec = self.registered.settings.get(key)
        if spec is None:
            raise KeyError(f"extension '{self.name}' has not declared setting '{key}'")
        return self._setting_values.get(key, spec.default)
