"""Run a request through the job queue and stream it to Gradio: progress to gr.Progress,
live previews into the gallery, then the saved images and their generation info."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import gradio as gr

from pipelines.jobs import Progress
from pipelines.request import GenerationRequest, GenerationResult
from ui.errors import user_error

PREVIEW_INTERVAL_S = 0.3  # at most ~3 preview frames a second go over the websocket
QUEUE_POLL_S = 0.5  # how often a waiting job's queue position is refreshed
# Generation events may all start at once: the job queue below orders them fairly between
# users (Gradio's own queue is first-come) and one worker owns the device.
DEVICE_EVENT_SLOTS = 48


def owner_of(request: Any) -> str:
    """Jobs belong to the logged-in user, else to the browser (or gradio_client) session that
    started them, so Interrupt stops only one's own."""
    username = getattr(request, "username", None)
    if username:
        return f"user:{username}"
    return f"session:{getattr(request, 'session_hash', None) or 'anonymous'}"


def stream_job(jobs: Any, request: GenerationRequest, owner: str,
               progress: Callable[..., Any] | None = None) -> Iterator[tuple[Any, Any]]:
    """Yields (gallery, generation_info) pairs: previews first (info skipped), then the result.
    Leaving early (the browser went away, Gradio cancelled) cancels the job."""
    try:
        job = jobs.submit(request, owner)
    except ValueError as exc:  # over a limit, or too many jobs queued
        raise user_error(exc) from exc
    last_preview = 0.0
    try:
        while not job.wait_started(QUEUE_POLL_S):
            if progress is not None:
                ahead = jobs.position(job)
                progress(0.0, desc=f"queued: {ahead} job(s) ahead of yours")
        for event in job.events():
            if progress is not None:
                progress(event.fraction, desc=describe(event))
            now = time.monotonic()
            if event.preview is not None and now - last_preview >= PREVIEW_INTERVAL_S:
                last_preview = now
                yield [event.preview], gr.skip()
        result = job.result()
    except Exception as exc:
        raise user_error(exc) from exc
    finally:
        if not job.finished:
            job.cancel()
    if result.interrupted:
        gr.Info(f"Interrupted: {len(result.images)} of {request.total_images} image(s) finished")
    for warning in result.warnings:
        gr.Warning(warning)
    yield gallery_items(result), generation_info(request, result)


def describe(event: Progress) -> str:
    text = f"step {event.step}/{event.total_steps}"
    if event.batch_count > 1:
        text = f"batch {event.batch_index + 1}/{event.batch_count}, {text}"
    return f"{text} ({event.note})" if event.note else text


def gallery_items(result: GenerationResult) -> list:
    """The saved files when there are any (their PNG keeps the infotext for downloads),
    else the images themselves."""
    if result.paths and len(result.paths) == len(result.images):
        return [str(path) for path in result.paths]
    return list(result.images)


def generation_info(request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    """What the UI and gradio_client callers get next to the images (the infotext JSON)."""
    info = {
        "task": request.task,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "checkpoint": request.checkpoint,
        "vae": request.vae,
        "sampler": request.sampler,
        "schedule": request.schedule,
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
        "width": request.width,
        "height": request.height,
        "styles": list(request.styles),
        "clip_skip": request.clip_skip,
        "emphasis": request.emphasis,
        "tiling": request.tiling,
        "seed": result.seeds[0] if result.seeds else request.seed,
        "seeds": list(result.seeds),
        "subseed": result.subseeds[0] if result.subseeds else request.subseed,  # resolved, not -1
        "subseeds": list(result.subseeds),
        "subseed_strength": request.subseed_strength,
        "infotexts": list(result.infotexts),
        "paths": [str(path) for path in result.paths],
        "interrupted": result.interrupted,
        "warnings": list(result.warnings),
    }
    if request.task != "txt2img":
        info["denoising_strength"] = request.denoising_strength
    return info


def infotext_at(info: Any, index: int | None) -> str:
    if not isinstance(info, dict) or not info.get("infotexts"):
        return ""
    texts = info["infotexts"]
    index = index if index is not None and 0 <= index < len(texts) else 0
    return texts[index]


def wire_generate_buttons(ctx: Any, reg: Any, tab: str, handler: Callable, fields: Any,
                          model_fields: Any, api_name: str) -> None:
    """Generate (a public API endpoint on the shared device queue) and Interrupt for one tab."""
    reg[f"{tab}.generate"].click(
        handler,
        inputs_kwargs=reg.keyword_inputs(fields, prefix=f"{tab}.") | reg.keyword_inputs(model_fields),
        outputs=reg.many(f"{tab}.gallery", f"{tab}.generation_info"),
        api_name=api_name, concurrency_id="device", concurrency_limit=DEVICE_EVENT_SLOTS,
        show_progress_on=[reg[f"{tab}.progress"]])

    def interrupt(request: gr.Request) -> None:
        ctx.jobs.cancel(owner_of(request))

    reg[f"{tab}.interrupt"].click(interrupt, api_visibility="private", queue=False)
