"""Extra-network tags in prompts (`<lora:name:0.8>`, `<hypernet:name:1>`, any `<kind:name:args>`).

A1111 rules (`modules/extra_networks.py`): a tag is `<` + word characters + `:` + anything but `>`
+ `>`; its body splits on `:`; the first item is the network name, the rest are arguments, where an
argument `key=value` is named (`te=0.5`) and any other one positional. Tags are removed from the
prompt text (nothing is put in their place) wherever they are, including inside parentheses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<kind:name:arg:...>` tag. `args` are the raw items after the name, in order."""

    kind: str
    name: str
    args: tuple[str, ...] = ()

    @property
    def positional(self) -> tuple[str, ...]:
        """Arguments without `=` (A1111 positional parameters after the name)."""
        return tuple(a for a in self.args if "=" not in a)

    @property
    def named(self) -> dict[str, str]:
        """`key=value` arguments (A1111 named parameters such as `te=`, `unet=`, `dyn=`)."""
        pairs = (a.split("=", 1) for a in self.args if "=" in a)
        return {key.strip(): value.strip() for key, value in pairs}

    def multiplier(self, i: int = 0, default: float = 1.0) -> float:
        """Positional argument `i` (0 = first after the name) as a float, or `default` if absent."""
        positional = self.positional
        if i >= len(positional) or positional[i].strip() == "":
            return default
        return _to_float(positional[i], self)

    def lora_weights(self) -> tuple[float, float]:
        """(text-encoder, unet) multipliers the way A1111's LoRA network reads them.

        `<lora:n>` -> (1, 1); `<lora:n:w>` -> (w, w); `<lora:n:te:unet>` -> (te, unet);
        named `te=` / `unet=` override the positional values.
        """
        named = self.named
        te = self.multiplier(0, 1.0)
        if "te" in named:
            te = _to_float(named["te"], self)
        unet = self.multiplier(1, te)
        if "unet" in named:
            unet = _to_float(named["unet"], self)
        return te, unet

    def dyn_dim(self) -> int | None:
        """LoRA dynamic dimension (`<lora:n:te:unet:dyn>` or `dyn=`), None when absent."""
        value = self.named.get("dyn")
        if value is None and len(self.positional) > 2:
            value = self.positional[2]
        if value is None or value.strip() == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{self.text()}: dyn must be a whole number, got {value!r}") from None

    def text(self) -> str:
        """The tag as written in a prompt."""
        return "<" + ":".join((self.kind, self.name) + self.args) + ">"


def _to_float(value: str, tag: ExtraNetworkTag) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"{tag.text()}: {value!r} is not a number; write a weight like <{tag.kind}:{tag.name}:0.8>"
        ) from None


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every extra-network tag from `text`; return (text without tags, tags in order)."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        items = match.group(2).split(":")
        tags.append(ExtraNetworkTag(kind=match.group(1), name=items[0], args=tuple(items[1:])))
        return ""

    return _TAG.sub(take, text), tags
