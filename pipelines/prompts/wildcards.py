"""Wildcards and dynamic prompts (`{a|b}`, `{2$$a|b|c}`, `__name__` from data/wildcards/*.txt)
through the `dynamicprompts` library. A1111 syntax (`(x:1.2)`, `[a:b:5]`, `[a|b]`, `<lora:..>`)
passes through it untouched. Prompts without `{` or `__` are returned as they are."""
from __future__ import annotations

import re
from pathlib import Path

WILDCARD_MODES = ("random", "combinatorial")
_WILDCARD = re.compile(r"__([\w./ -]+?)__")


def has_dynamic_syntax(text: str) -> bool:
    return "{" in text or "__" in text


class WildcardResolver:
    def __init__(self, wildcards_dir: Path) -> None:
        self.wildcards_dir = Path(wildcards_dir)

    def names(self) -> list[str]:
        if not self.wildcards_dir.is_dir():
            return []
        return sorted(p.relative_to(self.wildcards_dir).with_suffix("").as_posix()
                      for p in self.wildcards_dir.rglob("*.txt"))

    def resolve(self, template: str, seeds: list[int], mode: str = "random") -> list[str]:
        """One prompt per seed. random: each image draws with its own seed (same seed, same
        prompt); combinatorial: the combinations in order, repeated when the batch is larger."""
        if mode not in WILDCARD_MODES:
            raise ValueError(f"wildcard mode must be one of {', '.join(WILDCARD_MODES)}, got '{mode}'")
        if not has_dynamic_syntax(template):
            return [template] * len(seeds)
        self._check_names(template)
        from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
        from dynamicprompts.wildcards import WildcardManager

        manager = WildcardManager(self.wildcards_dir)
        try:
            if mode == "random":
                prompts = [RandomPromptGenerator(wildcard_manager=manager, seed=seed).generate(template, 1)[0]
                           for seed in seeds]
            else:
                prompts = CombinatorialPromptGenerator(wildcard_manager=manager).generate(template, len(seeds))
        except Exception as exc:  # the library raises its own parse errors
            raise ValueError(f"the dynamic prompt syntax could not be read ({exc}); check its {{ }} pairs") from exc
        if not prompts:
            return [template] * len(seeds)
        return [prompts[i % len(prompts)] for i in range(len(seeds))]

    def _check_names(self, template: str) -> None:
        known = set(self.names())
        missing = sorted({m for m in _WILDCARD.findall(template) if m not in known and "*" not in m})
        if missing:
            raise ValueError(f"wildcard(s) not found: {', '.join(missing)}; add "
                             f"{', '.join(m + '.txt' for m in missing)} to {self.wildcards_dir}")
