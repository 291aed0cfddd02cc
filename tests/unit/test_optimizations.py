"""Fast-mode bookkeeping: compile is reported once per shape (again after a restore or a QKV
change), the progress text carries the note, compile mode/backend and the LoRA hot-swap
preparation reach torch.compile / diffusers in the right order (a recording stand-in UNet), and
the options validate and come from the settings."""
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


# --- compile options, hot-swap order, the compiled-shapes record --------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.settings import Settings  # noqa: E402


class _RecordingUNet(torch.nn.Module):
    """Stands in for a UNet: records the compile and hot-swap calls FastMode makes."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3)
        self._device = torch.device(device)
        self.calls: list[tuple[str, dict]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    def enable_lora_hotswap(self, **kwargs) -> None:
        self.calls.append(("hotswap", kwargs))

    def compile_repeated_blocks(self, **kwargs) -> None:
        self.calls.append(("regional", kwargs))

    def compile(self, **kwargs) -> None:
        self.calls.append(("whole", kwargs))


def _compile_calls(device="cpu", **options):
    unet = _RecordingUNet(device)
    mode = FastMode(Optimizations(fast=True, compile=True, **options))
    mode.apply({"unet": unet})
    mode.apply({"unet": unet})  # idempotent: compiled once
    return unet.calls


def test_compile_mode_and_backend_reach_torch_compile():
    assert _compile_calls() == [("regional", {"backend": "inductor", "dynamic": False, "fullgraph": False})]
    # CUDA graphs: the whole UNet, so that one graph covers the step
    assert _compile_calls("cuda", compile_mode="reduce-overhead") == [
        ("whole", {"backend": "inductor", "dynamic": False, "fullgraph": False, "mode": "reduce-overhead"})]
    # ... and only on CUDA: elsewhere the default mode, regional
    assert _compile_calls("cpu", compile_mode="reduce-overhead") == [
        ("regional", {"backend": "inductor", "dynamic": False, "fullgraph": False})]
    # modes are inductor options: a test backend gets none
    assert _compile_calls(compile_backend="eager", compile_mode="max-autotune") == [
        ("regional", {"backend": "eager", "dynamic": False, "fullgraph": False})]


def test_lora_hotswap_is_enabled_before_compiling():
    calls = _compile_calls(lora_hotswap_rank=64)
    assert [name for name, _ in calls] == ["hotswap", "regional"]
    assert calls[0][1] == {"target_rank": 64, "check_compiled": "ignore"}
    assert [name for name, _ in _compile_calls()] == ["regional"]  # rank 0: no hot-swap preparation


def test_restore_and_qkv_changes_clear_the_compiled_shapes_record():
    from tests import factories

    shape = ("txt2img", 64, 64, 1)
    mode = FastMode(Optimizations(fast=True, compile=True, compile_backend="eager"))
    unet = factories.tiny_unet(0)
    components = {"unet": unet}
    mode.apply(components)
    assert mode.compile_pending(shape) and not mode.compile_pending(shape)
    mode.apply(components, with_loras=True)  # unfused for LoRAs: other modules, compiled again
    assert mode.compile_pending(shape) and not mode.compile_pending(shape)
    mode.restore(components)
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules())
    assert mode.compile_pending(shape)  # the next activation compiles (and says so) again


def test_optimizations_validate_and_come_from_settings(tmp_path):
    with pytest.raises(ValueError, match="compile mode"):
        Optimizations(compile_mode="fastest")
    with pytest.raises(ValueError, match="deepcache interval"):
        Optimizations(deepcache_interval=1)
    with pytest.raises(ValueError, match="tomesd ratio"):
        Optimizations(tomesd_ratio=0.9)
    assert not Optimizations().accelerated and Optimizations(tomesd_ratio=0.3).accelerated
    home = ["--data-dir", str(tmp_path)]
    settings = Settings.from_sources(home + ["--fast-compile", "--fast-compile-mode", "reduce-overhead",
                                             "--fast-lora-rank", "32", "--deepcache", "3", "--tomesd", "0.5"], {})
    assert Optimizations.from_settings(settings) == Optimizations(
        fast=True, compile=True, compile_mode="reduce-overhead", lora_hotswap_rank=32, deepcache_interval=3,
        tomesd_ratio=0.5)
    plain = Optimizations.from_settings(Settings.from_sources(home, {}))
    assert plain == Optimizations() and not plain.accelerated  # everything off by default
    assert Optimizations.from_settings(Settings.from_sources(home + ["--fast"], {})).lora_hotswap_rank == 0
