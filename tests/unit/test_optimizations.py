"""Fast-mode bookkeeping that needs no model: compile is reported once per shape, and the
progress text carries the note."""
from pipelines.jobs import Progress
from pipelines.optimizations import FastMode, Optimizations


def test_compile_is_pending_once_per_shape_and_only_with_compile_on():
    mode = FastMode(Optimizations(fast=True, compile=True))
    assert mode.compile_pending(("txt2img", 512, 512, 1))
    assert not mode.compile_pending(("txt2img", 512, 512, 1))  # compiled graphs reused
    assert mode.compile_pending(("txt2img", 512, 768, 1))
    assert not FastMode(Optimizations(fast=True)).compile_pending(("txt2img", 512, 512, 1))


def test_progress_text_shows_the_compile_note():
    from pipelines.generate import COMPILE_NOTE
    from ui.generation import describe
    assert describe(Progress(0, 20, 0, 1, note=COMPILE_NOTE)) == f"step 0/20 ({COMPILE_NOTE})"
    assert describe(Progress(3, 20, 0, 1)) == "step 3/20"
