"""Per-request limits from the settings (max size, steps, images, upload pixels), checked
once when a request joins the job queue, so the UI, the Gradio API and the REST API all hit
the same guard. GenerationRequest itself only rejects what can never work (width 7, NaN CFG);
these are the operator's choice for a shared machine."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.memory import final_size
from pipelines.request import GenerationRequest


@dataclass(frozen=True)
class RequestLimits:
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_images: int = 16
    max_upload_pixels: int = 4096 * 4096
    max_prompt_chars: int = 20_000  # A1111 prompts rarely pass 2,000; megabytes only stall the tokenizer

    @classmethod
    def from_settings(cls, settings) -> "RequestLimits":
        return cls(max_width=settings.max_width, max_height=settings.max_height, max_steps=settings.max_steps,
                   max_batch_images=settings.max_batch_images, max_upload_pixels=settings.max_upload_pixels)

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError naming every limit the request exceeds and the setting to change."""
        problems = []
        if request.width > self.max_width:
            problems.append(f"width {request.width} is above this server's limit of {self.max_width} (max_width)")
        if request.height > self.max_height:
            problems.append(f"height {request.height} is above this server's limit of {self.max_height} (max_height)")
        if request.steps > self.max_steps:
            problems.append(f"steps {request.steps} is above this server's limit of {self.max_steps} (max_steps)")
        if request.enable_hr:
            problems += self._hires_problems(request)
        if request.total_images > self.max_batch_images:
            problems.append(f"batch count x batch size = {request.total_images} images is above this server's "
                            f"limit of {self.max_batch_images} (max_batch_images)")
        for name in ("prompt", "negative_prompt"):
            length = len(getattr(request, name))
            if length > self.max_prompt_chars:
                problems.append(f"{name.replace('_', ' ')} is {length} characters, above this server's limit of "
                                f"{self.max_prompt_chars}; shorten it")
        images = [(name.replace("_", " "), getattr(request, name)) for name in ("init_image", "mask")]
        images += [(f"ControlNet unit {i} image", unit.image) for i, unit in enumerate(request.control_units)]
        for label, image in images:
            if image is not None and image.width * image.height > self.max_upload_pixels:
                problems.append(f"{label} {image.width}x{image.height} has more pixels than "
                                f"this server accepts ({self.max_upload_pixels}, max_upload_pixels); scale it down")
        if problems:
            raise ValueError("; ".join(problems))

    def _hires_problems(self, request: GenerationRequest) -> list[str]:
        """The hires pass decodes at its target size and samples its own steps: both count."""
        problems = []
        try:
            width, height = final_size(request)
        except ValueError:
            return []  # a target the request itself refuses (too small) is not a limit question
        if width > self.max_width or height > self.max_height:
            problems.append(f"hires fix target {width}x{height} is above this server's limit of "
                            f"{self.max_width}x{self.max_height} (max_width/max_height); lower the upscale")
        if request.hr_second_pass_steps > self.max_steps:
            problems.append(f"hires steps {request.hr_second_pass_steps} is above this server's limit of "
                            f"{self.max_steps} (max_steps)")
        return problems

    __call__ = check  # JobQueue(admit=limits)
