"""The job queue: one worker thread owns the device; every job reports progress and can be
cancelled by its owner only.

Progress travels through a per-job queue.Queue, so a consumer blocks on the next event
instead of polling a shared state object.
"""
from __future__ import annotations

import collections
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
    note: str = ""  # what is happening besides sampling (e.g. a one-off compile)

    @property
    def fraction(self) -> float:
        done = self.batch_index * self.total_steps + self.step
        return done / max(1, self.batch_count * self.total_steps)


class CancelToken:
    """Set by the owner (Interrupt); read by the sampler's step callback. `skip()` (A1111's
    Skip) ends only the image batch being sampled: generation clears it at each batch boundary
    and goes on with the next one."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._skip = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def skipping(self) -> bool:
        """The current batch should stop sampling (it is kept, decoded from where it stopped)."""
        return self._skip.is_set()

    def batch_done(self) -> None:
        """Called by generation after each batch: a skip applied to that batch only."""
        self._skip.clear()


ProgressSink = Callable[[Progress], None]
RunFunction = Callable[[GenerationRequest, ProgressSink, CancelToken], GenerationResult]

_DONE = object()


class QueueFullError(ValueError):
    """One user asked for more queued jobs than the per-user cap allows."""


class Job:
    def __init__(self, job_id: int, owner: str, request: GenerationRequest) -> None:
        self.id = job_id
        self.owner = owner
        self.request = request
        self.token = CancelToken()
        self.latest: Progress | None = None
        self._events: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._finished = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    # Called by the worker.
    def _report(self, progress: Progress) -> None:
        self.latest = progress
        self._events.put(progress)

    def _finish(self, result: GenerationResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._started.set()
        self._finished.set()
        self._events.put(_DONE)

    # Called by the consumer.
    def wait_started(self, timeout: float | None = None) -> bool:
        """True once the worker took the job (or it ended without running)."""
        return self._started.wait(timeout)

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
    def started(self) -> bool:
        return self._started.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        self.token.cancel()

    def skip(self) -> None:
        self.token.skip()


class JobQueue:
    """Round robin between owners: each owner has a FIFO of jobs, and the worker takes one job
    from each owner in turn, so nobody waits behind more than one job per other user (A1111's
    single FIFO let one user's batch of 50 block everyone). `max_queued_per_user` caps one
    owner's unfinished jobs; `admit` (the request limits) refuses a request before it queues.
    A failure of `run` is translated by `explain` (out of memory -> a short message) after
    device memory was freed."""

    def __init__(self, run: RunFunction, *, max_queued_per_user: int = 4,
                 admit: Callable[[GenerationRequest], None] | None = None,
                 explain: Callable[[BaseException], BaseException] | None = None) -> None:
        self._run = run
        self._max_per_owner = max_queued_per_user
        self._admit = admit
        self._explain = explain or _default_explain
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._waiting: dict[str, collections.deque[Job]] = {}  # owner -> FIFO, in turn order
        self._current: Job | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> "JobQueue":
        with self._changed:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name="easel-device-worker", daemon=True)
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the device worker thread has been started (and not stopped)."""
        return self._thread is not None

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    def submit(self, request: GenerationRequest, owner: str = "") -> Job:
        if self._admit is not None:
            self._admit(request)
        with self._changed:
            unfinished = len(self._waiting.get(owner, ())) + (self._current is not None and self._current.owner == owner)
            if unfinished >= self._max_per_owner:
                raise QueueFullError(
                    f"you already have {unfinished} job(s) queued or running (the limit is "
                    f"{self._max_per_owner}); wait for one to finish or interrupt it")
            job = Job(next(self._ids), owner, request)
            self._waiting.setdefault(owner, collections.deque()).append(job)
            self._changed.notify_all()
        self.start()
        return job

    # --- who may see and cancel what ---------------------------------------------------------

    def cancel(self, owner: str, job_id: int | None = None) -> int:
        """Cancel one owner's running and waiting jobs (or just `job_id` of theirs)."""
        mine = [j for j in self._unfinished() if j.owner == owner and job_id in (None, j.id)]
        for job in mine:
            job.cancel()
        return len(mine)

    def skip(self, owner: str) -> int:
        """Skip the image batch the owner's running job is sampling (A1111 Skip); the job goes on
        with its next batch. Waiting jobs are not touched. How many jobs were skipped (0 or 1)."""
        with self._changed:
            job = self._current
        if job is None or job.owner != owner:
            return 0
        job.skip()
        return 1

    def cancel_all(self) -> int:
        """For admins: every running and waiting job."""
        jobs = self._unfinished()
        for job in jobs:
            job.cancel()
        return len(jobs)

    def position(self, job: Job) -> int:
        """How many jobs run before this one (0: it runs now or next)."""
        with self._changed:
            order = self._schedule()
            ahead = 1 if self._current is not None and self._current is not job else 0
        return ahead + order.index(job) if job in order else 0

    def view(self, viewer: str, admin: bool = False) -> list[dict]:
        """The queue as `viewer` may see it: their own jobs, or everyone's for an admin."""
        with self._changed:
            running = [self._current] if self._current is not None else []
            jobs = running + self._schedule()
        return [{"id": job.id, "owner": job.owner if admin else None, "mine": job.owner == viewer,
                 "state": "running" if job is self._current else "waiting", "position": index,
                 "task": job.request.task, "cancelled": job.token.cancelled}
                for index, job in enumerate(jobs) if admin or job.owner == viewer]

    def current(self) -> Job | None:
        return self._current

    def queued_count(self) -> int:
        with self._changed:
            return sum(len(q) for q in self._waiting.values()) + (1 if self._current else 0)

    # --- the worker --------------------------------------------------------------------------

    def _unfinished(self) -> list[Job]:
        with self._changed:
            return ([self._current] if self._current else []) + [j for q in self._waiting.values() for j in q]

    def _schedule(self) -> list[Job]:
        """Waiting jobs in the order they will run (caller holds the lock)."""
        queues = [list(q) for q in self._waiting.values()]
        order = []
        for depth in range(max((len(q) for q in queues), default=0)):
            order += [q[depth] for q in queues if depth < len(q)]
        return order

    def _next_job(self) -> Job | None:
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            owner = next(iter(self._waiting))
            jobs = self._waiting.pop(owner)
            job = jobs.popleft()
            if jobs:
                self._waiting[owner] = jobs  # re-inserted last: the owner's next turn comes after the others
            self._current = job
            job._started.set()
            return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                if job.token.cancelled:  # cancelled while waiting: never touch the device
                    result = GenerationResult(images=[], infotexts=[], seeds=[], paths=[], interrupted=True)
                else:
                    result = self._run(job.request, job._report, job.token)
            except BaseException as exc:  # the worker must survive any job's failure
                job._finish(None, self._explain(exc))
            else:
                job._finish(result, None)
            finally:
                with self._changed:
                    self._current = None


def _default_explain(exc: BaseException) -> BaseException:
    from pipelines.faults import explain_failure

    return explain_failure(exc)
