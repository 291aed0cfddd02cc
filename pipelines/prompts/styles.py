"""Prompt styles in A1111's `styles.csv` format (columns name, prompt, negative_prompt).

Applying a style: a `{prompt}` placeholder in the style text is replaced by the user's text,
otherwise the style text is appended after ", ". Reading an infotext back, styles whose text
is found at the prompt's edges are stripped out again and their names returned (A1111 rules).
The file is read on every call (it is small and the user may edit it by hand) and written
atomically; nothing is cached in module state.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from pipelines.outputs import atomic_write_text

PLACEHOLDER = "{prompt}"
FIELDS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_style_text(style_text: str, prompt: str) -> str:
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def _strip_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    prompt, style_text = prompt.strip(), style_text.strip()
    if PLACEHOLDER in style_text:
        left, _, right = style_text.partition(PLACEHOLDER)
        if prompt.startswith(left) and prompt.endswith(right) and len(prompt) >= len(left) + len(right):
            return True, prompt[len(left):len(prompt) - len(right)]
        return False, prompt
    if prompt.endswith(style_text):
        rest = prompt[:len(prompt) - len(style_text)]
        return True, rest[:-2] if rest.endswith(", ") else rest
    return False, prompt


class StyleStore:
    """data/styles.csv. `path` need not exist yet (no styles)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[Style]:
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8-sig")
        styles = []
        for row in csv.DictReader(io.StringIO(text), skipinitialspace=True):
            name = (row.get("name") or "").strip()
            if name:
                styles.append(Style(name, row.get("prompt") or "", row.get("negative_prompt") or ""))
        return styles

    def names(self) -> list[str]:
        return [s.name for s in self.load()]

    def get(self, names) -> list[Style]:
        by_name = {s.name: s for s in self.load()}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"unknown style(s): {', '.join(missing)}; pick one of: {', '.join(by_name) or 'none saved yet'}")
        return [by_name[n] for n in names]

    def apply(self, names, prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied, in order."""
        for style in self.get(names):
            prompt = merge_style_text(style.prompt, prompt)
            negative_prompt = merge_style_text(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """(style names, prompt, negative prompt) with the styles' text taken back out."""
        candidates = [s for s in self.load() if s.prompt or s.negative_prompt]
        found: list[str] = []
        progress = True
        while progress:
            progress = False
            for style in candidates:
                ok_pos, new_prompt = _strip_style_text(style.prompt, prompt)
                ok_neg, new_negative = _strip_style_text(style.negative_prompt, negative_prompt)
                if ok_pos and ok_neg:
                    prompt, negative_prompt = new_prompt, new_negative
                    candidates.remove(style)
                    found.append(style.name)
                    progress = True
                    break
        return list(reversed(found)), prompt, negative_prompt

    def save(self, style: Style) -> None:
        """Add or replace a style by name."""
        name = style.name.strip()
        if not name:
            raise ValueError("a style needs a name")
        styles = [s for s in self.load() if s.name != name]
        existing = {s.name: i for i, s in enumerate(self.load())}
        new = Style(name, style.prompt, style.negative_prompt)
        if name in existing:
            styles.insert(min(existing[name], len(styles)), new)
        else:
            styles.append(new)
        self._write(styles)

    def delete(self, name: str) -> None:
        styles = self.load()
        if name not in {s.name for s in styles}:
            raise ValueError(f"unknown style: {name}")
        self._write([s for s in styles if s.name != name])

    def _write(self, styles: list[Style]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(FIELDS)
        for s in styles:
            writer.writerow((s.name, s.prompt, s.negative_prompt))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, buffer.getvalue())
