"""A named registry of Gradio components (oobabooga's `shared.gradio` idea, per app, not global).

Tabs register what they build under stable dotted names ("txt2img.prompt"); event wiring looks
components up by name, so handlers get keyword inputs instead of lists tied to layout order.
"""
from __future__ import annotations

from typing import Any, Iterable


class ComponentRegistry:
    def __init__(self) -> None:
        self._components: dict[str, Any] = {}

    def add(self, name: str, component: Any) -> Any:
        if name in self._components:
            raise ValueError(f"component name '{name}' is registered twice")
        self._components[name] = component
        return component

    def __getitem__(self, name: str) -> Any:
        try:
            return self._components[name]
        except KeyError:
            raise KeyError(f"no component named '{name}' (known: {', '.join(sorted(self._components))})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._components

    def names(self) -> list[str]:
        return list(self._components)

    def many(self, *names: str) -> list[Any]:
        return [self[name] for name in names]

    def keyword_inputs(self, fields: Iterable[str], prefix: str = "") -> dict[str, Any]:
        """{field: component} for Gradio's `inputs_kwargs`, e.g. prefix "txt2img." and field
        "steps" -> the handler receives `steps=`."""
        return {name: self[prefix + name] for name in fields}
