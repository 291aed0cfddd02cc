"""The text each image of a request is generated from: styles applied first (A1111 order),
then wildcards / dynamic prompts resolved per image. What comes out is what is encoded and
what the image's infotext records. It also carries the app-wide prompt-encoding option
`sdxl_clip_l_skip` (A1111's "Clip skip SDXL", a setting rather than a request field)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.prompts.styles import StyleStore
from pipelines.prompts.wildcards import WildcardResolver

STYLES_FILE = "styles.csv"
WILDCARDS_DIR = "wildcards"


@dataclass(frozen=True)
class ImagePrompt:
    prompt: str
    negative_prompt: str


class PromptSource:
    def __init__(self, styles: StyleStore | None = None, wildcards: WildcardResolver | None = None,
                 sdxl_clip_l_skip: bool = False) -> None:
        self.styles = styles
        self.wildcards = wildcards
        self.sdxl_clip_l_skip = bool(sdxl_clip_l_skip)  # SDXL: clip skip applies to CLIP-L (A1111 option)

    @classmethod
    def for_data_dir(cls, data_dir: Path, sdxl_clip_l_skip: bool = False) -> "PromptSource":
        data_dir = Path(data_dir)
        return cls(StyleStore(data_dir / STYLES_FILE), WildcardResolver(data_dir / WILDCARDS_DIR),
                   sdxl_clip_l_skip=sdxl_clip_l_skip)

    def prepare(self, request, base_seed: int):
        """(request with its styles applied to prompt and negative prompt, one ImagePrompt per
        image with wildcards resolved from the image's seed)."""
        prompt, negative = request.prompt, request.negative_prompt
        if request.styles:
            if self.styles is None:
                raise ValueError("styles are not available here: remove them from the request")
            prompt, negative = self.styles.apply(request.styles, prompt, negative)
            request = request.with_changes(prompt=prompt, negative_prompt=negative)
        seeds = [base_seed + i for i in range(request.total_images)]
        return request, self.image_prompts(prompt, negative, (), seeds, request.wildcard_mode)

    def image_prompts(self, prompt: str, negative_prompt: str, styles: tuple[str, ...], seeds: list[int],
                      wildcard_mode: str = "random") -> list[ImagePrompt]:
        if styles:
            if self.styles is None:
                raise ValueError("styles are not available here: remove them from the request")
            prompt, negative_prompt = self.styles.apply(styles, prompt, negative_prompt)
        if self.wildcards is None:
            return [ImagePrompt(prompt, negative_prompt) for _ in seeds]
        prompts = self.wildcards.resolve(prompt, seeds, wildcard_mode)
        negatives = self.wildcards.resolve(negative_prompt, seeds, wildcard_mode)
        return [ImagePrompt(p, n) for p, n in zip(prompts, negatives)]
