"""A1111's token counter under the prompt boxes ("23/75"): the longest text the prompt can
become during sampling (each AND part, each editing step) counts, extra-network tags do not."""
from __future__ import annotations

from pipelines.prompts.encoding import count_tokens
from pipelines.prompts.extra_networks import extract_extra_networks
from pipelines.prompts.parser import prompt_schedule, split_and


def prompt_token_count(tokenizer, prompt: str, steps: int = 20) -> tuple[int, int]:
    """(tokens, chunk limit): the limit is 75 per started chunk, like A1111's counter."""
    text, _ = extract_extra_networks(prompt or "")
    best = (0, 75)
    for part, _weight in split_and(text):
        for _step, variant in prompt_schedule(part, steps):
            best = max(best, count_tokens(tokenizer, variant))
    return best


def format_count(count: tuple[int, int]) -> str:
    return f"{count[0]}/{count[1]}"
