"""`GET /sdapi/v1/progress` from the shared job queue: the running job's live step, an ETA and
the latest preview, whoever started the job (UI or API). Idle is exactly `progress == 0` and
`state.job_count == 0`, which webuiapi and SillyTavern wait for."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from api.images import encode_png


class ProgressTracker:
    """Remembers, per running job, when it was first seen and its last preview, so the ETA
    and `current_image` need nothing from the engine beyond `Job.latest`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._job_id: int | None = None
        self._first_seen = (0.0, 0.0)  # (time, fraction)
        self._preview = None
        self._timestamp = "0"

    def report(self, jobs: Any, skip_current_image: bool = False, viewer: str | None = None) -> dict[str, Any]:
        """`viewer` (a job owner) limits the report to that owner's jobs: another user's running
        job reads as idle, with the viewer's own waiting jobs as `job_count`."""
        job = jobs.current()
        queued = jobs.queued_count()
        if viewer is not None and (job is None or job.owner != viewer):
            return _idle(len(jobs.view(viewer)))
        if job is None:
            return _idle(queued)
        latest = job.latest
        fraction = latest.fraction if latest is not None else 0.0
        with self._lock:
            now = self._clock()
            if job.id != self._job_id:
                self._job_id, self._first_seen, self._preview = job.id, (now, fraction), None
                self._timestamp = time.strftime("%Y%m%d%H%M%S")
            if latest is not None and latest.preview is not None:
                self._preview = latest.preview
            started, start_fraction = getattr(job, "started_at", None), 0.0
            if started is None:
                started, start_fraction = self._first_seen
            preview, timestamp = self._preview, self._timestamp
        elapsed = now - started
        done = fraction - start_fraction
        eta = elapsed / done * (1 - fraction) if done > 0 else 0.0
        request = job.request
        state = {
            "skipped": bool(getattr(job.token, "skipping", False)),
            "interrupted": job.token.cancelled,
            "stopping_generation": job.token.cancelled,
            "job": f"{request.task} {job.id}",
            "job_count": max(queued, 1),
            "job_timestamp": timestamp,
            "job_no": latest.batch_index if latest is not None else 0,
            "sampling_step": latest.step if latest is not None else 0,
            "sampling_steps": latest.total_steps if latest is not None else request.steps,
        }
        return {
            # A running job never reads as idle, even before its first step.
            "progress": max(fraction, 0.01) if fraction < 1 else 1.0,
            "eta_relative": eta,
            "state": state,
            "current_image": None if skip_current_image or preview is None else encode_png(preview, None),
            "textinfo": f"step {state['sampling_step']}/{state['sampling_steps']}",
        }


def _idle(queued: int) -> dict[str, Any]:
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": queued, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
