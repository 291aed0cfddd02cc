"""Failures inside a request leave the engine clean: out of memory (simulated by a torch call
that raises) frees memory, reports a short message and the next request gives the same pixels
as before; an interrupt mid-step leaves no lock held and no state behind; one user's checkpoint
choice never leaks into another user's request."""
import functools
import threading

import numpy as np
import pytest
import torch

from pipelines.faults import OUT_OF_MEMORY
from pipelines.generate import generate
from pipelines.jobs import JobQueue
from pipelines.request import GenerationRequest

BASE = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=5, sampler="Euler", seed=5,
            save_images=False)


def request(**changes):
    return GenerationRequest(**{**BASE, **changes})


def locks(manager):
    return {key: record.locks for key, record in manager.cache._records.items()}


@pytest.fixture
def queue(engine):
    manager, _ = engine
    jobs = JobQueue(functools.partial(generate, manager, None), max_queued_per_user=10)
    yield jobs
    jobs.stop()


def test_out_of_memory_frees_memory_says_what_to_do_and_the_next_request_is_unchanged(engine, queue, monkeypatch):
    manager, _ = engine
    before = queue.submit(request(checkpoint="tinyA"), "a").result(60).images[0]
    snapshot = manager.snapshot()
    freed = []
    monkeypatch.setattr("pipelines.faults.free_device_memory", lambda: freed.append(True))
    real_conv = torch.nn.functional.conv2d
    calls = []

    def conv2d_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:  # from the middle of the first UNet pass on: the sliced retry fails too
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_conv(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d_out_of_memory)
    with pytest.raises(ValueError) as raised:
        queue.submit(request(checkpoint="tinyA"), "a").result(60)
    monkeypatch.setattr(torch.nn.functional, "conv2d", real_conv)
    assert str(raised.value) == OUT_OF_MEMORY and freed == [True, True]  # before the retry, after it
    assert all(count == 0 for count in locks(manager).values())
    assert manager.snapshot() == snapshot
    after = queue.submit(request(checkpoint="tinyA"), "a").result(60).images[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))


def test_an_interrupt_mid_step_leaves_the_manager_clean(engine, queue):
    manager, _ = engine
    reference = queue.submit(request(checkpoint="tinyB", steps=6), "a").result(60).images[0]
    job = queue.submit(request(checkpoint="tinyB", steps=40, seed=6), "a")
    for progress in job.events():
        if progress.step == 2:
            assert queue.cancel("a") == 1
    interrupted = job.result(60)
    assert interrupted.interrupted and len(interrupted.images) == 1
    assert all(count == 0 for count in locks(manager).values())
    again = queue.submit(request(checkpoint="tinyB", steps=6), "a").result(60).images[0]
    assert np.array_equal(np.asarray(reference), np.asarray(again))


def test_one_users_checkpoint_never_leaks_into_another_users_request(engine, queue):
    """Alternating users and checkpoints, submitted from two threads at once: every image is
    the one its own checkpoint gives when run alone."""
    manager, _ = engine
    alone = {ckpt: generate(manager, None, request(checkpoint=ckpt, steps=2)).images[0] for ckpt in ("tinyA", "tinyB")}
    assert not np.array_equal(np.asarray(alone["tinyA"]), np.asarray(alone["tinyB"]))
    results: dict[str, list] = {"alice": [], "bob": []}

    def user(name, checkpoint):
        for _ in range(3):
            result = queue.submit(request(checkpoint=checkpoint, steps=2), name).result(120)
            results[name].append((result.images[0], result.infotexts[0]))

    threads = [threading.Thread(target=user, args=("alice", "tinyA")),
               threading.Thread(target=user, args=("bob", "sub/tinyB.safetensors"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for name, ckpt in (("alice", "tinyA"), ("bob", "tinyB")):
        assert len(results[name]) == 3
        for image, infotext in results[name]:
            assert np.array_equal(np.asarray(image), np.asarray(alone[ckpt])) and f"Model: {ckpt}," in infotext
