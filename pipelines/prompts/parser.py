"""The A1111 prompt grammar: emphasis weights, BREAK, AND, and prompt-editing schedules.

Three independent passes, applied in A1111's order to one prompt (after styles and after the
extra-network tags are removed):
  1. `split_and(prompt)`      -> [(sub-prompt, weight)]  composable-diffusion parts.
  2. `prompt_schedule(text, steps)` -> [(last_step, text)]  editing `[a:b:when]` / alternation `[a|b]`.
  3. `parse_attention(text)`  -> [(fragment, weight)]  `(x)`, `(x:1.3)`, `[x]`, escapes, BREAK.
Written from A1111's documented behaviour (`modules/prompt_parser.py`), not copied from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0  # a ("BREAK", -1) fragment marks a chunk break
BREAK = "BREAK"

# --- 3. emphasis -----------------------------------------------------------------------------

_ATTENTION_TOKEN = re.compile(r"""
    \\[()\[\]\\] | \\              # escapes (a lone backslash is dropped)
  | \( | \[                        # openers
  | :\s*([+-]?[.\d]+)\s*\)         # ':1.3)' closes a round bracket with an explicit weight
  | \) | \]                        # closers
  | [^\\()\[\]:]+ | :              # text
""", re.X)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Fragments with weights; adjacent fragments of equal weight are merged.

    Unclosed brackets still apply to everything after them; `("BREAK", -1.0)` marks BREAK.
    """
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, piece in enumerate(_BREAK_SPLIT.split(token)):
                if i:
                    parts.append([BREAK, BREAK_WEIGHT])
                parts.append([piece, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for part in parts or [["", 1.0]]:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


def _weight(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"'{value}' in the prompt is not a valid weight; write it like (word:1.2)") from None


def uses_emphasis(text: str) -> bool:
    """Whether any fragment has a weight other than 1 (A1111 writes "Emphasis" only then)."""
    return any(w not in (1.0, BREAK_WEIGHT) for _, w in parse_attention(text))


# --- 1. AND --------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_TRAILING_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """`a :1.2 AND b` -> [("a", 1.2), ("b", 1.0)]: the parts of a composable-diffusion prompt."""
    result = []
    for part in _AND.split(prompt):
        match = _TRAILING_WEIGHT.match(part)
        text, weight = match.group(1), match.group(2)
        result.append((text, float(weight) if weight is not None else 1.0))
    return result


# --- 2. editing and alternation ------------------------------------------------------------
# A tree of nodes: str (literal text), _Scheduled, _Alternate, _Group (brackets kept as text).

@dataclass
class _Scheduled:
    before: list
    after: list
    when: str  # the number as written: a '.' means a fraction of the steps


@dataclass
class _Alternate:
    options: list[list]


@dataclass
class _Group:  # '(...)', '(...:...)', '[...]': kept verbatim, children may hold schedules
    opener: str
    children: list
    separator_and_weight: list | None
    closer: str


class _NoMatch(Exception):
    pass


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")


class _ScheduleParser:
    """Recursive descent with backtracking. At the top level a bracket that does not open a
    well-formed construct is literal text (A1111 tolerates stray `()[]:` there); inside a
    construct everything must be well formed, or the construct is not one."""

    def __init__(self, text: str) -> None:
        self.text = text

    def parse(self) -> list:
        nodes, pos = [], 0
        while pos < len(self.text):
            try:
                node, pos = self._construct(pos)
                nodes.append(node)
                continue
            except _NoMatch:
                pass
            match = _PLAIN.match(self.text, pos)
            if match:
                nodes.append(match.group(0))
                pos = match.end()
            elif self.text[pos] in "()[]:":
                nodes.append(self.text[pos])
                pos += 1
            else:  # '|' outside brackets or a trailing lone backslash: A1111 gives up on editing
                raise _NoMatch
        return nodes

    def _sequence(self, pos: int) -> tuple[list, int]:
        """A prompt inside a construct: plain text and nested constructs, up to `:|)]`."""
        nodes = []
        while pos < len(self.text):
            match = _PLAIN.match(self.text, pos)
            if match:
                nodes.append(match.group(0))
                pos = match.end()
            elif self.text[pos] in "([":
                node, pos = self._construct(pos)
                nodes.append(node)
            else:
                break
        return nodes, pos

    def _expect(self, pos: int, char: str) -> int:
        if pos < len(self.text) and self.text[pos] == char:
            return pos + 1
        raise _NoMatch

    def _construct(self, pos: int):
        if pos >= len(self.text) or self.text[pos] not in "([":
            raise _NoMatch
        if self.text[pos] == "(":
            inner, after = self._sequence(pos + 1)
            if after < len(self.text) and self.text[after] == ":":
                weight, end = self._sequence(after + 1)
                return _Group("(", inner, [":"] + weight, ")"), self._expect(end, ")")
            return _Group("(", inner, None, ")"), self._expect(after, ")")
        first, after = self._sequence(pos + 1)
        if after >= len(self.text):
            raise _NoMatch
        char = self.text[after]
        if char == "]":
            return _Group("[", first, None, "]"), after + 1
        if char == "|":
            options = [first]
            while after < len(self.text) and self.text[after] == "|":
                option, after = self._sequence(after + 1)
                options.append(option)
            return _Alternate(options), self._expect(after, "]")
        if char != ":":
            raise _NoMatch
        number = _NUMBER.match(self.text, after + 1)
        if number:  # [to:when]
            return _Scheduled([], first, number.group(1)), number.end()
        second, after = self._sequence(after + 1)
        after = self._expect(after, ":")
        number = _NUMBER.match(self.text, after)
        if not number:
            raise _NoMatch
        return _Scheduled(first, second, number.group(1)), number.end()


def _when_step(when: str, steps: int) -> int:
    value = float(when)
    step = value * steps if "." in when else value
    return min(steps, int(step))


def _switch_steps(nodes: list, steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            step = _when_step(node.when, steps)
            if step >= 1:
                found.add(step)
            _switch_steps(node.before, steps, found)
            _switch_steps(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _switch_steps(option, steps, found)
        elif isinstance(node, _Group):
            _switch_steps(node.children, steps, found)
            _switch_steps(node.separator_and_weight or [], steps, found)


def _render(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = node.before if step <= _when_step(node.when, steps) else node.after
            out.append(_render(chosen, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(node.opener + _render(node.children, step, steps)
                       + _render(node.separator_and_weight or [], step, steps) + node.closer)
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last_step, text)] sorted by step, A1111's `get_learned_conditioning_prompt_schedules`.

    `[cat:dog:0.5]` over 20 steps -> [(10, "cat"), (20, "dog")]; a number with a '.' is a
    fraction of `steps`, otherwise a step number. A prompt that does not parse has no editing.
    Which step uses which entry is `text_at_step`'s business (A1111's off-by-one included).
    """
    steps = max(1, int(steps))
    try:
        nodes = _ScheduleParser(prompt).parse()
    except _NoMatch:
        return [(steps, prompt)]
    switches: set[int] = {steps}
    _switch_steps(nodes, steps, switches)
    return [(step, _render(nodes, step, steps)) for step in sorted(switches)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text the 1-based sampling `step` is conditioned on, picked as A1111 picks it.

    A1111's denoiser counts its calls from 0 (`CFGDenoiser.step`) and `reconstruct_cond_batch`
    takes the first entry with `call <= last_step`; step k is call k-1. So `[cat:dog:0.5]` over
    20 steps ([(10, "cat"), (20, "dog")]) is "cat" for steps 1-11 and "dog" for steps 12-20,
    and `[a|b]` gives a, a, b, a, b, ... (the schedule's last entry is never reached).
    """
    call = step - 1
    for last_step, text in schedule:
        if call <= last_step:
            return text
    return schedule[-1][1]
