"""The job queue between users: round robin, a per-user cap, own-only cancel, admin view,
queue positions, and out-of-memory failures that free memory and leave the worker serving."""
import threading

import pytest

from pipelines.faults import OUT_OF_MEMORY
from pipelines.jobs import JobQueue, QueueFullError
from pipelines.request import GenerationRequest, GenerationResult


def _gated_run(order, gate):
    def run(request, report, token):
        gate.wait(10)
        order.append(request.prompt)
        return GenerationResult(images=[], infotexts=[request.prompt], seeds=[], paths=[],
                                interrupted=token.cancelled)
    return run


def _submit_while_blocked(queue, gate, jobs):
    """Hold the worker on a first job so the rest queue up, then submit `jobs` (owner, prompt)."""
    first = queue.submit(GenerationRequest(prompt="first"), owner="z")
    assert first.wait_started(5)
    return first, [queue.submit(GenerationRequest(prompt=p), owner=o) for o, p in jobs]


def test_round_robin_between_users_instead_of_first_come():
    order, gate = [], threading.Event()
    queue = JobQueue(_gated_run(order, gate), max_queued_per_user=10)
    try:
        _first, jobs = _submit_while_blocked(queue, gate, [("a", "a1"), ("a", "a2"), ("a", "a3"),
                                                           ("b", "b1"), ("c", "c1"), ("b", "b2")])
        assert [queue.position(j) for j in jobs] == [1, 4, 6, 2, 3, 5]
        gate.set()
        for job in jobs:
            job.result(10)
        assert order == ["first", "a1", "b1", "c1", "a2", "b2", "a3"]
    finally:
        gate.set()
        queue.stop()


def test_per_user_cap_counts_running_and_waiting_jobs_and_says_what_to_do():
    order, gate = [], threading.Event()
    queue = JobQueue(_gated_run(order, gate), max_queued_per_user=2)
    try:
        _first, jobs = _submit_while_blocked(queue, gate, [("z", "z2"), ("a", "a1")])
        with pytest.raises(QueueFullError, match=r"already have 2 job\(s\) queued or running \(the limit is 2\); wait"):
            queue.submit(GenerationRequest(prompt="z3"), owner="z")
        queue.submit(GenerationRequest(prompt="a2"), owner="a")  # another user is not affected
        gate.set()
        jobs[0].result(10)
        assert queue.submit(GenerationRequest(prompt="z4"), owner="z").result(10).infotexts == ["z4"]
    finally:
        gate.set()
        queue.stop()


def test_users_cancel_only_their_own_jobs_admins_cancel_all_and_views_hide_other_owners():
    order, gate = [], threading.Event()
    queue = JobQueue(_gated_run(order, gate), max_queued_per_user=10)
    try:
        first, (a1, b1, b2) = _submit_while_blocked(queue, gate, [("a", "a1"), ("b", "b1"), ("b", "b2")])
        assert queue.cancel("b", job_id=a1.id) == 0  # b names a's job: nothing happens
        assert queue.cancel("b", job_id=b2.id) == 1
        mine = queue.view("a")
        assert [(j["id"], j["mine"], j["owner"], j["state"]) for j in mine] == [(a1.id, True, None, "waiting")]
        everyone = queue.view("root", admin=True)
        assert [(j["owner"], j["state"]) for j in everyone] == [("z", "running"), ("a", "waiting"),
                                                                 ("b", "waiting"), ("b", "waiting")]
        assert everyone[3]["cancelled"] is True
        gate.set()
        assert b2.result(10).interrupted and "b2" not in order  # cancelled while waiting: never ran
        assert not a1.result(10).interrupted and not b1.result(10).interrupted
        gate.clear()
        running = queue.submit(GenerationRequest(prompt="x"), owner="a")
        waiting = queue.submit(GenerationRequest(prompt="y"), owner="b")
        assert running.wait_started(5)
        assert queue.cancel_all() == 2
        gate.set()
        assert running.result(10).interrupted and waiting.result(10).interrupted
    finally:
        gate.set()
        queue.stop()


def test_out_of_memory_frees_memory_reports_a_short_message_and_the_next_job_runs(monkeypatch):
    import torch

    freed = []
    monkeypatch.setattr("pipelines.faults.free_device_memory", lambda: freed.append(True))

    def run(request, report, token):
        if request.prompt == "huge":
            hog = torch.zeros(1024)  # noqa: F841 - held by the frame until the traceback is dropped
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return GenerationResult(images=[], infotexts=["ok"], seeds=[], paths=[])

    queue = JobQueue(run)
    try:
        with pytest.raises(ValueError) as raised:
            queue.submit(GenerationRequest(prompt="huge"), owner="a").result(10)
        assert str(raised.value) == OUT_OF_MEMORY and freed == [True]
        assert queue.submit(GenerationRequest(prompt="small"), owner="a").result(10).infotexts == ["ok"]
    finally:
        queue.stop()


def test_admit_refuses_before_queueing():
    def admit(request):
        if request.steps > 10:
            raise ValueError("steps must be at most 10")

    queue = JobQueue(lambda *a: None, admit=admit)
    with pytest.raises(ValueError, match="at most 10"):
        queue.submit(GenerationRequest(steps=11), owner="a")
    assert queue.queued_count() == 0


def test_rest_progress_shows_a_logged_in_user_only_their_own_job():
    from PIL import Image

    from api.progress import ProgressTracker
    from pipelines.jobs import Progress

    gate, reported = threading.Event(), threading.Event()

    def run(request, report, token):
        report(Progress(step=1, total_steps=4, batch_index=0, batch_count=1, preview=Image.new("RGB", (8, 8))))
        reported.set()
        gate.wait(10)
        return GenerationResult(images=[], infotexts=[], seeds=[], paths=[])

    queue = JobQueue(run)
    tracker = ProgressTracker()
    try:
        job = queue.submit(GenerationRequest(prompt="private"), owner="user:alice")
        queue.submit(GenerationRequest(prompt="b"), owner="user:bob")
        assert reported.wait(5)
        bob = tracker.report(queue, viewer="user:bob")
        assert bob["progress"] == 0 and bob["current_image"] is None and bob["state"]["job_count"] == 1
        alice = tracker.report(queue, viewer="user:alice")
        assert alice["progress"] == 0.25 and alice["current_image"] is not None
        assert tracker.report(queue)["current_image"] is not None  # no login: one local user sees all
        gate.set()
        job.result(10)
    finally:
        gate.set()
        queue.stop()


def test_a_waiting_ui_job_shows_how_many_jobs_are_ahead(monkeypatch):
    import ui.generation as generation

    monkeypatch.setattr(generation, "QUEUE_POLL_S", 0.05)
    order, gate = [], threading.Event()
    queue = JobQueue(_gated_run(order, gate), max_queued_per_user=10)
    seen = []
    try:
        _first, _jobs = _submit_while_blocked(queue, gate, [("a", "a1")])

        def progress(fraction, desc):
            seen.append(desc)
            if len(seen) == 3:
                gate.set()

        outputs = list(generation.stream_job(queue, GenerationRequest(prompt="mine"), "b", progress))
    finally:
        gate.set()
        queue.stop()
    assert seen[0] == "queued: 2 job(s) ahead of yours"  # the running job and a1
    assert outputs[-1][1]["infotexts"] == ["mine"] and order == ["first", "a1", "mine"]


def test_users_skip_only_their_own_running_batch():
    seen, gate = {}, threading.Event()

    def run(request, report, token):
        gate.wait(10)
        seen[request.prompt] = token.skipping  # what the sampler would see at its next step
        return GenerationResult(images=[], infotexts=[request.prompt], seeds=[], paths=[])

    queue = JobQueue(run, max_queued_per_user=10)
    try:
        running = queue.submit(GenerationRequest(prompt="a1"), owner="a")
        assert running.wait_started(5)
        waiting = queue.submit(GenerationRequest(prompt="b1"), owner="b")
        assert queue.skip("b") == 0  # b has no running job; a's is not b's to skip
        assert not running.token.skipping
        assert queue.skip("a") == 1
        assert running.token.skipping and not waiting.token.skipping
        gate.set()
        running.result(10), waiting.result(10)
        assert seen == {"a1": True, "b1": False}
        assert queue.skip("a") == 0  # nothing of a's runs any more
    finally:
        gate.set()
        queue.stop()
