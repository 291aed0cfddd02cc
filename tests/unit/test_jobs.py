import threading

import pytest

from pipelines.jobs import JobQueue, Progress
from pipelines.request import GenerationRequest, GenerationResult


def _result(tag):
    return GenerationResult(images=[], infotexts=[tag], seeds=[], paths=[])


def test_jobs_run_in_order_on_one_worker_and_stream_progress():
    order, threads = [], set()

    def run(request, report, token):
        threads.add(threading.current_thread().name)
        for step in range(1, 4):
            report(Progress(step=step, total_steps=3, batch_index=0, batch_count=1))
        order.append(request.prompt)
        return _result(request.prompt)

    queue = JobQueue(run).start()
    try:
        jobs = [queue.submit(GenerationRequest(prompt=p), owner="u") for p in ("a", "b", "c")]
        steps = [p.step for p in jobs[0].events()]
        assert steps == [1, 2, 3]
        assert [j.result(10).infotexts[0] for j in jobs] == ["a", "b", "c"]
        assert order == ["a", "b", "c"] and threads == {"easel-device-worker"}
    finally:
        queue.stop()


def test_cancel_only_touches_the_owners_jobs_and_errors_propagate():
    gate = threading.Event()

    def run(request, report, token):
        gate.wait(5)
        if request.prompt == "boom":
            raise ValueError("bad thing")
        return _result("cancelled" if token.cancelled else "done")

    queue = JobQueue(run).start()
    try:
        mine = queue.submit(GenerationRequest(prompt="x"), owner="alice")
        theirs = queue.submit(GenerationRequest(prompt="y"), owner="bob")
        broken = queue.submit(GenerationRequest(prompt="boom"), owner="bob")
        assert mine.wait_started(5)
        assert queue.cancel("alice") == 1
        gate.set()
        assert mine.result(10).infotexts == ["cancelled"]
        assert theirs.result(10).infotexts == ["done"]
        with pytest.raises(ValueError, match="bad thing"):
            broken.result(10)
        # the worker survived the failure
        assert queue.submit(GenerationRequest(prompt="z")).result(10).infotexts == ["done"]
    finally:
        queue.stop()


def test_progress_fraction_spans_batches():
    assert Progress(step=5, total_steps=10, batch_index=1, batch_count=2).fraction == 0.75
