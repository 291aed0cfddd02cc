"""The job queue: one worker thread owns the device; every job reports progress and can be
cancelled by its owner only.

Progress travels through a per-job queue.Queue, so a consumer blocks on the next event
instead of polling a shared state object.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from PIL import Image

from pipelines.request import GenerationRequest, GenerationResult


@dataclass(frozen=True)
class Progress:
    step: int  # steps done in the current image batch
    total_steps: int
    batch_index: int  # 0-based batch (of batch_count)
    batch_count: int
    preview: Image.Image | None = None

    @property
    def fraction(self) -> float:
        done = self.batch_index * self.total_steps + self.step
        return done / max(1, self.batch_count * self.total_steps)


class CancelToken:
    """Set by the owner (Interrupt); read by the sampler's step callback."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


ProgressSink = Callable[[Progress], None]
RunFunction = Callable[[GenerationRequest, ProgressSink, CancelToken], GenerationResult]

_DONE = object()


class Job:
    def __init__(self, job_id: int, owner: str, request: GenerationRequest) -> None:
        self.id = job_id
        self.owner = owner
        self.request = request
        self.token = CancelToken()
        self.latest: Progress | None = None
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    # Called by the worker.
    def _report(self, progress: Progress) -> None:
        self.latest = progress
        self._events.put(progress)

    def _finish(self, result: GenerationResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._finished.set()
        self._events.put(_DONE)

    # Called by the consumer.
    def events(self) -> Iterator[Progress]:
        """Progress events until the job ends (then call result())."""
        while True:
            item = self._events.get()
            if item is _DONE:
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        self.token.cancel()


class JobQueue:
    def __init__(self, run: RunFunction) -> None:
        self._run = run
        self._pending: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._waiting: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> "JobQueue":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="easel-device-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._pending.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest, owner: str = "") -> Job:
        job = Job(next(self._ids), owner, request)
        with self._lock:
            self._waiting.append(job)
        self._pending.put(job)
        self.start()
        return job

    def cancel(self, owner: str) -> int:
        """Cancel the running and waiting jobs of one owner; returns how many were cancelled."""
        with self._lock:
            mine = [j for j in self._waiting + ([self._current] if self._current else []) if j.owner == owner]
        for job in mine:
            job.cancel()
        return len(mine)

    def current(self) -> Job | None:
        return self._current

    def queued_count(self) -> int:
        with self._lock:
            return len(self._waiting) + (1 if self._current else 0)

    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self._pending.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job)
                self._current = job
            try:
                result = self._run(job.request, job._report, job.token)
            except BaseException as exc:  # the worker must survive any job's failure
                job._finish(None, exc)
            else:
                job._finish(result, None)
            finally:
                with self._lock:
                    self._current = None
