"""One request per line. A line is a prompt, or A1111's "prompts from file" option syntax:
`--prompt "a cat" --negative_prompt "blur" --steps 20 --seed 5 --sampler_name "Euler a"`."""
from __future__ import annotations

import shlex
from typing import Any, Callable

from pipelines.generate import resolve_seed
from pipelines.request import GenerationRequest, GenerationResult

MAX_LINES = 1000
# A1111 option -> (request field, type)
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "sampler_name": ("sampler", str),
    "scheduler": ("schedule", str),
    "width": ("width", int),
    "height": ("height", int),
    "batch_size": ("batch_size", int),
    "n_iter": ("batch_count", int),
    "denoising_strength": ("denoising_strength", float),
    "sd_model": ("checkpoint", str),
}


def parse_line(line: str, number: int = 1) -> dict[str, Any]:
    """The request changes one line asks for."""
    text = line.strip()
    if not text.startswith("--"):
        return {"prompt": text}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"line {number}: {exc} (check the quotes)") from None
    changes: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = token[2:] if token.startswith("--") else None
        if name not in OPTIONS:
            known = ", ".join("--" + k for k in OPTIONS)
            raise ValueError(f"line {number}: unknown option {token!r}; known: {known}")
        if i + 1 >= len(tokens):
            raise ValueError(f"line {number}: {token} needs a value")
        field, cast = OPTIONS[name]
        try:
            changes[field] = cast(tokens[i + 1])
        except ValueError:
            raise ValueError(f"line {number}: {token} {tokens[i + 1]!r} is not a {cast.__name__}") from None
        i += 2
    return changes


def requests_from_text(base: GenerationRequest, text: str, iterate_seed: bool = False) -> list[GenerationRequest]:
    """Validated requests for every non-blank line. A random seed is drawn once for the batch;
    with `iterate_seed` each line starts after the seeds the previous line used."""
    lines = [(n, line) for n, line in enumerate((text or "").splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError("no prompts: write one per line, or upload a text file")
    if len(lines) > MAX_LINES:
        raise ValueError(f"{len(lines)} lines is too many (at most {MAX_LINES})")
    seed = resolve_seed(base.seed)
    requests = []
    for number, line in lines:
        changes = parse_line(line, number)
        try:
            request = base.with_changes(**{"seed": seed, **changes})
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        requests.append(request)
        if iterate_seed and "seed" not in changes:
            seed += request.total_images
    return requests


def run_lines(requests: list[GenerationRequest], run: Callable[[GenerationRequest], GenerationResult]
              ) -> list[GenerationResult]:
    results = []
    for request in requests:
        result = run(request)
        results.append(result)
        if result.interrupted:
            break
    return results
