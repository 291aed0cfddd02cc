"""DeepCache and token merging on tiny-world: on, the image changes a little (far less than
another seed changes it) and the UNet really does less; off, the image is pixel-identical to the
plain path; after a request every wrapper, class swap and hook is gone from the cached UNet.
Compares runs with each other (tiny-world is retrained from time to time)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.accelerators import deep_cache
from pipelines.generate import generate
from pipelines.optimizations import Optimizations
from pipelines.request import GenerationRequest
from tests.integration.conftest import make_engine

TINYWORLD = Path(__file__).resolve().parents[2] / "assets" / "tinyworld" / "tinyworld.safetensors"
STEPS = 20  # DeepCache reuses features across steps: at 6 steps tiny-world's change is another seed's


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tw-acc")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    (root / "embeddings").mkdir()
    (folder / "tw.safetensors").symlink_to(TINYWORLD)
    manager, _ = make_engine(root, root / "data")
    return manager


def _request(seed=21):
    return GenerationRequest(prompt="a red square on a blue background", checkpoint="tw.safetensors", width=64,
                             height=64, steps=STEPS, seed=seed, sampler="Euler", save_images=False)


def _image(manager, seed=21):
    return np.asarray(generate(manager, None, _request(seed)).images[0], dtype=np.int16)


def _psnr(a, b) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def _unet_state(manager):
    with manager.pipeline("txt2img", "tw.safetensors") as active:
        unet = active.pipe.unet
    return unet, {
        "classes": sorted({type(m).__name__ for m in unet.modules()}),
        "own_forward": [n for n, m in unet.named_modules() if "forward" in m.__dict__],
        "tome": [n for n, m in unet.named_modules() if hasattr(m, "_tome_info")],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules()),
    }


@pytest.fixture(scope="module")
def baseline(engine):
    unet, state = _unet_state(engine)
    return {"plain": _image(engine), "other_seed": _image(engine, seed=22), "state": state, "unet": unet}


def _with_options(manager, options, count_mid=False):
    manager.fast.options = options
    calls = []
    unet = _unet_state(manager)[0]
    hook = unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.append(1)) if count_mid else None
    try:
        return _image(manager), len(calls)
    finally:
        if hook:
            hook.remove()
        manager.fast.options = Optimizations()


@pytest.mark.parametrize("options, mid_calls", [(Optimizations(deepcache_interval=3), 7),
                                                (Optimizations(tomesd_ratio=0.5), STEPS)],
                         ids=["deepcache", "tomesd"])
def test_accelerator_changes_the_image_a_little_and_is_undone(engine, baseline, options, mid_calls):
    image, calls = _with_options(engine, options, count_mid=True)
    plain, other = baseline["plain"], baseline["other_seed"]
    assert calls == mid_calls  # DeepCache: the deep part ran at steps 0, 3, 6, ..., 18 only
    assert not np.array_equal(image, plain)
    # a little: clearly closer to the plain image than another seed's image is (measured on
    # tiny-world: DeepCache 3 +4.8 dB, ToMe 0.5 +6.6 dB over the other seed's 13.4 dB)
    assert _psnr(image, plain) > _psnr(other, plain) + 2
    again, _ = _with_options(engine, options)
    assert np.array_equal(again, image)  # deterministic (ToMe's random partition is seeded)
    unet, state = _unet_state(engine)
    assert unet is baseline["unet"] and state == baseline["state"]  # no wrapper, class or hook left
    assert np.array_equal(_image(engine), plain)  # off again: pixel-identical to plain


def test_accelerators_off_touch_nothing(engine, baseline):
    image, _ = _with_options(engine, Optimizations(fast=False))
    assert np.array_equal(image, baseline["plain"])
    with engine.pipeline("txt2img", "tw.safetensors") as active:
        with engine.accelerators.applied(active.pipe.unet, Optimizations()) as names:
            assert names == [] and _unet_state(engine)[1] == baseline["state"]


def test_deepcache_counts_steps_from_the_timesteps_it_sees():
    """A new denoising run (the timestep goes up again, e.g. a hires pass) starts with a full call."""
    from tests import factories

    unet = factories.tiny_unet(0)
    full = []
    unet.mid_block.resnets[0].register_forward_hook(lambda *_: full.append(1))  # inside: runs on full calls only
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with deep_cache(unet, interval=2), torch.no_grad():
        for run in ((900, 600, 300, 100), (700, 300)):  # a second run at other timesteps
            full.append(("run", len(run)))
            for t in run:
                unet(sample, torch.tensor(t), encoder_hidden_states=context)
    assert full == [("run", 4), 1, 1, ("run", 2), 1]  # steps 0 and 2 of run 1, step 0 of run 2
    assert not any("forward" in m.__dict__ for m in unet.modules())
