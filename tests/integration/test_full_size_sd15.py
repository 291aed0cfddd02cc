"""A full-size SD1.5-layout single file (random weights, 860M-parameter UNet) through the same
offline path a user's checkpoint takes: registry probe -> bundled config -> manager -> one step."""
import numpy as np
import pytest
import torch

from pipelines.arch import Arch
from pipelines.generate import generate
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine


@pytest.mark.slow
def test_full_size_sd15_checkpoint_loads_offline_and_runs_one_step(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    factories.write_full_size_sd15_checkpoint(ckpt_dir / "sd15-random.safetensors", seed=0)
    manager, _ = make_engine(root, root / "data", ram_bytes=8 << 30)
    entry = manager.registry.find("checkpoint", "sd15-random.safetensors")
    assert entry.arch is Arch.SD1
    request = GenerationRequest(prompt="a photo of a cat", width=64, height=64, steps=1, seed=0,
                                sampler="Euler", save_images=False, checkpoint="sd15-random")
    result = generate(manager, None, request)
    with manager.pipeline("txt2img", "sd15-random") as active:
        unet_params = sum(p.numel() for p in active.pipe.unet.parameters())
    assert unet_params == 859_520_964
    assert result.images[0].size == (64, 64)
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()
    assert torch.get_default_dtype() == torch.float32
