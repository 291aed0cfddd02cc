"""Optional training-free accelerators, off by default: applied to one request's UNet, undone after.

- DeepCache (the `DeepCache` package): the UNet runs in full only every N-th call; on the calls
  in between, DeepCache's block wrappers return the deep features cached at the last full call
  and only the shallow branch (conv_in -> the last up block's last layer, branch 0) is computed.
  The package's helper finds the step by looking the timestep up in `pipe.scheduler`; Easel
  builds a pipeline (and scheduler) per request and per pass (hires, ControlNet over
  `from_pipe`), so the step is counted from the timesteps the UNet itself sees instead: a
  timestep higher than the last one starts a new denoising run (full call, counter at 0).
- Token merging (`tomesd`): in the transformer blocks of the highest-resolution level, `ratio`
  of the tokens are merged (bipartite soft matching) before self-attention and unmerged after.
  Its random partition uses a generator seeded per request, so the same seed gives the same
  image.

Both change the image a little (PSNR/SSIM against the plain output: BENCHMARKS.md). Everything
they change on the modules (forward wrappers, block classes, hooks, attributes) is removed when
the block ends, so the cached UNet goes back to what the loader made.
"""
from __future__ import annotations

import logging
import weakref
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Iterator

import torch

from pipelines.optimizations import Optimizations

log = logging.getLogger("easel.accelerators")


class Accelerators:
    """The manager's per-request step: applies the accelerators once per UNet (a nested pass,
    e.g. hires over the same UNet, finds them applied and leaves them to the outer request)."""

    def __init__(self) -> None:
        self._active: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()

    @contextmanager
    def applied(self, unet: torch.nn.Module | None, options: Optimizations) -> Iterator[list[str]]:
        if unet is None or not options.accelerated or unet in self._active:
            yield []
            return
        self._active.add(unet)
        try:
            with accelerated(unet, options) as names:
                yield names
        finally:
            self._active.discard(unet)


@contextmanager
def accelerated(unet: torch.nn.Module, options: Optimizations) -> Iterator[list[str]]:
    """Apply the accelerators `options` switches on to `unet` for this block; yields their names."""
    names: list[str] = []
    with ExitStack() as stack:
        if options.deepcache_interval > 1:
            stack.enter_context(deep_cache(unet, options.deepcache_interval))
            names.append(f"DeepCache {options.deepcache_interval}")
        if options.tomesd_ratio > 0:
            stack.enter_context(token_merging(unet, options.tomesd_ratio))
            names.append(f"ToMe {options.tomesd_ratio:g}")
        yield names


@contextmanager
def deep_cache(unet: torch.nn.Module, interval: int, branch: int = 0) -> Iterator[None]:
    """DeepCache on `unet`: a full UNet call every `interval` calls of a denoising run."""
    if interval < 2:
        raise ValueError("DeepCache needs an interval of at least 2 (1 would never reuse anything)")
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "mid_block"):
        raise ValueError("DeepCache needs a UNet with down/mid/up blocks (UNet2DConditionModel)")
    own_forward = {id(m): m.__dict__["forward"] for m in unet.modules() if "forward" in m.__dict__}
    helper = _step_counting_helper()(SimpleNamespace(unet=unet))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()
        for module in unet.modules():  # the package re-assigns bound methods: take them off again
            if id(module) in own_forward:
                module.__dict__["forward"] = own_forward[id(module)]
            else:
                module.__dict__.pop("forward", None)


def _step_counting_helper():
    from DeepCache import DeepCacheSDHelper

    class StepCountingDeepCache(DeepCacheSDHelper):
        """DeepCache's block skipping with the step taken from the UNet's own timesteps."""

        def wrap_unet_forward(self) -> None:
            unet = self.pipe.unet
            original = unet.forward
            self.function_dict["unet_forward"] = original
            last = [None]

            def forward(sample, timestep, *args, **kwargs):
                t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
                if last[0] is None or t > last[0]:  # a new run: the first call is a full one
                    self.cur_timestep, self.start_timestep = 0, None
                    self.cached_output = {}
                else:
                    self.cur_timestep += 1
                last[0] = t
                return original(sample, timestep, *args, **kwargs)

            unet.forward = forward

    return StepCountingDeepCache


@contextmanager
def token_merging(unet: torch.nn.Module, ratio: float, seed: int = 0) -> Iterator[None]:
    """tomesd on `unet` (self-attention of the highest-resolution blocks), removed after."""
    import tomesd

    if not 0 < ratio <= 0.75:
        raise ValueError("token merging ratio must be in (0, 0.75]")
    tomesd.apply_patch(unet, ratio=ratio, max_downsample=1, use_rand=True)
    generator_device = unet.device if unet.device.type in ("cpu", "cuda") else torch.device("cpu")
    unet._tome_info["args"]["generator"] = torch.Generator(generator_device).manual_seed(seed)
    try:
        yield
    finally:
        tomesd.remove_patch(unet)
        for module in unet.modules():
            module.__dict__.pop("_tome_info", None)
