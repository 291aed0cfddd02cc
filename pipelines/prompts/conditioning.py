"""Per-request conditioning for a diffusers pipeline: every prompt of a batch parsed once,
its editing/alternation schedule computed once, each schedule's texts encoded once (together,
as A1111 does: see EncodingCache), and the
tensors handed to diffusers as `prompt_embeds` / `negative_prompt_embeds` (+ pooled for SDXL).
When the schedule changes the conditioning, `callback_outputs` returns the new tensors from
`callback_on_step_end`, which diffusers uses for the following steps.

All tensors of a request have the same number of 77-token chunks: shorter ones (the negative
prompt, or an early edit) are padded with the encoding of an empty chunk, so positive and
negative can be batched together for classifier-free guidance.

Editing follows A1111's step indexing (`parser.text_at_step`): the conditioning of a model call
is the schedule entry of A1111's 0-based call counter. Samplers that call the model more often
than once a step (Heun, DPM2, DPM++ SDE) map their calls onto the steps proportionally.

The batches of one request share an `EncodingCache`, so each distinct text is encoded once per
request, not once per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipelines.prompts import composable
from pipelines.prompts.encoding import Encoded, EncoderStack, encode_prompts
from pipelines.prompts.extra_networks import extract_extra_networks
from pipelines.prompts.parser import prompt_schedule, split_and, text_at_step

Schedule = list[tuple[int, str]]


class EncodingCache:
    """Encoded prompts kept for the length of one request (every batch of it). Keyed by the
    text encoder and every encoding option too, so a pass with other encoders (hires with
    another checkpoint, a refiner) or other options can never get another pass's tensors.

    A text is encoded together with the other texts of its editing schedule (`group`, in
    schedule order): with "Original" emphasis A1111 restores the mean over all of them, so the
    same text in another schedule may encode differently and is cached apart."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[EncoderStack, Encoded]] = {}  # the stack keeps its ids alive

    def get(self, stack: EncoderStack, text: str, clip_skip: int, emphasis: str,
            sdxl_clip_l_skip: bool, group: tuple[str, ...] | None = None) -> Encoded:
        group = group if group is not None and len(group) > 1 else (text,)
        options = (tuple(id(e) for e in stack.text_encoders), tuple(id(t) for t in stack.tokenizers),
                   clip_skip, emphasis, sdxl_clip_l_skip and stack.has_clip_l, group)
        if options + (text,) not in self._entries:
            encoded = encode_prompts(stack, list(group), clip_skip, emphasis, sdxl_clip_l_skip=sdxl_clip_l_skip)
            for member, value in zip(group, encoded):
                self._entries.setdefault(options + (member,), (stack, value))
        return self._entries[options + (text,)][1]

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class PromptConditioning:
    stack: EncoderStack
    positive: list[Schedule]  # one schedule per image of the batch (its first AND part)
    negative: list[Schedule]
    steps: int
    clip_skip: int = 1
    emphasis: str = "Original"
    parts: list[list[tuple[Schedule, float]]] = field(default_factory=list)  # AND parts per image
    sdxl_clip_l_skip: bool = False  # A1111 "Clip skip SDXL": clip skip applies to SDXL's CLIP-L
    cache: EncodingCache = field(default_factory=EncodingCache, repr=False)  # shared by a request's batches
    _chunks: int = 1
    _current_step: int = 1
    _finished: bool = False
    pipe_id: int | None = None  # the pipeline these tensors fit; others (a refiner) get nothing
    first_step: int = 1  # the first step this pass samples: a refiner continues the base's schedule
    _wrapper: object = None  # the ComposableUNet while AND is in use
    _pipe: object = None

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = [[(s, 1.0)] for s in self.positive]
        self._chunks = max(self._encoded(text, s).chunks for s in self._all_schedules() for _, text in s)
        self._current_step = self.first_step

    # --- what generate.py uses -------------------------------------------------------------

    @property
    def changes_during_sampling(self) -> bool:
        return any(len(s) > 1 for s in self._all_schedules())

    @property
    def composable(self) -> bool:
        """Whether a prompt uses AND (or one part with a weight): the UNet must be wrapped."""
        return any(len(p) > 1 or p[0][1] != 1.0 for p in self.parts)

    def install(self, pipe) -> None:
        """Before sampling: wrap the pipe's UNet when AND is used (undone by `finish`)."""
        if not self.composable:
            return
        if getattr(pipe, "controlnet", None) is not None:
            raise ValueError("AND (composable diffusion) cannot be combined with ControlNet or T2I-Adapter "
                             "units: remove AND from the prompt or disable the units")
        self._wrapper, self._pipe = composable.install(pipe), pipe
        self._wrapper.set_parts(*self._part_tensors(self.first_step))

    @property
    def tensor_inputs(self) -> list[str]:
        """Names to add to `callback_on_step_end_tensor_inputs`."""
        if not self.changes_during_sampling:
            return []
        return ["prompt_embeds", "add_text_embeds"] if self.stack.sdxl else ["prompt_embeds"]

    def pipeline_kwargs(self, step: int | None = None) -> dict:
        """Keyword arguments for the pipeline call: the conditioning of 1-based `step` (default:
        the pass's first step)."""
        step = self.first_step if step is None else step
        pos, neg = self._batch(self.positive, step, negative=False), self._batch(self.negative, step, negative=True)
        kwargs = {"prompt_embeds": pos.embeds, "negative_prompt_embeds": neg.embeds}
        if self.stack.sdxl:
            kwargs["pooled_prompt_embeds"] = pos.pooled
            kwargs["negative_pooled_prompt_embeds"] = neg.pooled
        return kwargs

    def callback_outputs(self, pipe, step_index: int) -> dict:
        """From `callback_on_step_end` after 0-based `step_index`: the tensors for the next step,
        or {} when the conditioning does not change there."""
        if not self.changes_during_sampling or self._finished or (self.pipe_id not in (None, id(pipe))):
            return {}
        total = getattr(pipe, "num_timesteps", None) or self.steps
        end = getattr(pipe, "denoising_end", None)
        if isinstance(end, float) and 0 < end < 1:
            # the base of a refiner hand-over samples only the head of the full schedule
            total = len(pipe.scheduler.timesteps)
        # the next model call is `step_index + 1`; samplers with more calls than steps (second
        # order) map their calls onto the steps from `first_step` on proportionally
        span = self.steps - self.first_step + 1
        next_step = min(self.steps, self.first_step + math.floor((step_index + 1) * span / total))
        if self._texts_at(next_step) == self._texts_at(self._current_step):
            return {}
        self._current_step = next_step
        if self._wrapper is not None:
            self._wrapper.set_parts(*self._part_tensors(next_step))
        kwargs = self.pipeline_kwargs(next_step)
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", True))
        device = pipe._execution_device if hasattr(pipe, "_execution_device") else None

        def join(neg, pos):
            tensor = torch.cat([neg, pos]) if cfg else pos
            return tensor.to(device) if device is not None else tensor

        outputs = {"prompt_embeds": join(kwargs["negative_prompt_embeds"], kwargs["prompt_embeds"])}
        if self.stack.sdxl:
            outputs["add_text_embeds"] = join(kwargs["negative_pooled_prompt_embeds"], kwargs["pooled_prompt_embeds"])
        return outputs

    def chained(self, callback):
        """A `callback_on_step_end` that runs `callback` (progress, previews, interrupt), then
        hands diffusers this conditioning's tensors for the next step."""
        def on_step_end(pipe, step, timestep, tensors):
            return {**(callback(pipe, step, timestep, tensors) or {}), **self.callback_outputs(pipe, step)}

        return on_step_end

    def finish(self) -> None:
        """The pass this conditioning belongs to is over: later callbacks (a hires pass that
        shares the callback) must not receive its tensors."""
        self._finished = True
        if self._wrapper is not None:
            composable.uninstall(self._pipe)
            self._wrapper = None

    # --- internals ---------------------------------------------------------------------------

    def _all_schedules(self) -> list[Schedule]:
        return [s for p in self.parts for s, _ in p] + self.positive + self.negative

    def _texts_at(self, step: int) -> tuple:
        return tuple(text_at_step(s, step) for s in self._all_schedules())

    def _part_tensors(self, step: int):
        """AND parts at `step`: embeds [B, K, L, D], pooled [B, K, P] | None, weights [B, K];
        images with fewer parts are padded with weight-0 copies of their first part."""
        count = max(len(p) for p in self.parts)
        embeds, pooled, weights = [], [], []
        for parts in self.parts:
            padded = parts + [(parts[0][0], 0.0)] * (count - len(parts))
            encoded = [self._encoded(text_at_step(s, step), s) for s, _ in padded]
            embeds.append(torch.cat([self._padded(e) for e in encoded]))
            if self.stack.sdxl:
                pooled.append(torch.cat([e.pooled for e in encoded]))
            weights.append([w for _, w in padded])
        return (torch.stack(embeds), torch.stack(pooled) if self.stack.sdxl else None,
                torch.tensor(weights, dtype=torch.float32))

    def _encoded(self, text: str, schedule: Schedule | None = None) -> Encoded:
        group = tuple(t for _, t in schedule) if schedule else None
        return self.cache.get(self.stack, text, self.clip_skip, self.emphasis, self.sdxl_clip_l_skip, group)

    def _padded(self, encoded: Encoded) -> torch.Tensor:
        missing = self._chunks - encoded.chunks
        if missing == 0:
            return encoded.embeds
        empty = self._encoded("").embeds
        return torch.cat([encoded.embeds] + [empty] * missing, dim=1)

    def _batch(self, schedules: list[Schedule], step: int, negative: bool) -> Encoded:
        rows = [self._encoded(text_at_step(s, step), s) for s in schedules]
        embeds = torch.cat([self._padded(r) for r in rows])
        pooled = torch.cat([r.pooled for r in rows]) if self.stack.sdxl else None
        if negative and self.stack.force_zeros_for_empty_negative:
            # SDXL (A1111 and diffusers alike): an empty negative prompt is all zeros
            empty = torch.tensor([text_at_step(s, step) == "" for s in schedules])
            if empty.any():
                embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Encoded(embeds=embeds, pooled=pooled)


def build_conditioning(pipe, prompts: list[str], negative_prompts: list[str], steps: int,
                       clip_skip: int = 1, emphasis: str = "Original", sdxl_clip_l_skip: bool = False,
                       cache: EncodingCache | None = None, first_step: int = 1) -> PromptConditioning:
    """Parse (extra-network tags removed, AND checked, editing scheduled) and encode the prompts
    of one batch for `steps` sampling steps, of which this pass samples `first_step` to the end.
    Pass one `cache` to every batch of a request so a text the batches share is encoded once."""
    if len(prompts) != len(negative_prompts):
        raise ValueError("each image needs one prompt and one negative prompt")

    def schedule(text: str) -> Schedule:
        return prompt_schedule(extract_extra_networks(text)[0], steps)

    # A1111: only the positive prompt is split on AND; each part has its own editing schedule
    parts = [[(schedule(text), weight) for text, weight in split_and(extract_extra_networks(p)[0])]
             for p in prompts]
    return PromptConditioning(stack=EncoderStack.from_pipe(pipe), positive=[p[0][0] for p in parts], parts=parts,
                              negative=[schedule(n) for n in negative_prompts], steps=max(1, steps),
                              clip_skip=clip_skip, emphasis=emphasis, sdxl_clip_l_skip=sdxl_clip_l_skip,
                              cache=cache if cache is not None else EncodingCache(), pipe_id=id(pipe),
                              first_step=max(1, min(first_step, max(1, steps))))
