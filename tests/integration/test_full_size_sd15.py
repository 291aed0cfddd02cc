"""A full-size SD1.5-layout single file (random weights, 860M-parameter UNet) through the same
offline path a user's checkpoint takes: registry probe -> bundled config -> manager -> one step."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.arch import Arch
from pipelines.control import ControlUnit
from pipelines.generate import generate
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine

REQUEST = GenerationRequest(prompt="a photo of a cat", width=64, height=64, steps=1, seed=0,
                            sampler="Euler", save_images=False, checkpoint="sd15-random")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(manager, first image): writing and loading the 860M UNet is the slow part, done once."""
    root = tmp_path_factory.mktemp("sd15")
    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    factories.write_full_size_sd15_checkpoint(ckpt_dir / "sd15-random.safetensors", seed=0)
    # an SDXL ControlNet as the registry sees it: cross-attention 2048 wide (the header is enough)
    (root / "models" / "ControlNet").mkdir(parents=True)
    save_file({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 2048)},
              str(root / "models" / "ControlNet" / "diffusers_xl_canny_mid.safetensors"))
    manager, _ = make_engine(root, root / "data", ram_bytes=8 << 30)
    return manager, generate(manager, None, REQUEST).images[0]


@pytest.mark.slow
def test_full_size_sd15_checkpoint_loads_offline_and_runs_one_step(sd15):
    manager, image = sd15
    entry = manager.registry.find("checkpoint", "sd15-random.safetensors")
    assert entry.arch is Arch.SD1
    with manager.pipeline("txt2img", "sd15-random") as active:
        unet_params = sum(p.numel() for p in active.pipe.unet.parameters())
    assert unet_params == 859_520_964
    assert image.size == (64, 64)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.slow
def test_sdxl_controlnet_with_an_sd15_checkpoint_is_refused_before_loading(sd15):
    manager, image = sd15
    unit = ControlUnit(module="none", model="diffusers_xl_canny_mid", image=Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match=r"ControlNet diffusers_xl_canny_mid\.safetensors is for SDXL, but the "
                                         r"checkpoint sd15-random\S* is SD1\.x: pick a SD1\.x ControlNet"):
        generate(manager, None, REQUEST.with_changes(control_units=(unit,)))
    assert manager.load_counts["controlnet"] == 0  # refused from the header, nothing loaded
    # the refusal left the pipeline as it was: the same request without the unit, the same pixels
    again = generate(manager, None, REQUEST).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))
