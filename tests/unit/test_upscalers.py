"""Upscalers: tiny ESRGAN files (both key layouts, .pth and .safetensors) load and double the size,
tiling matches the untiled result, Lanczos/Nearest/latent modes, unsafe pickles are refused."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import upscalers
from pipelines.cache import ModelCache
from tests.upscaler_factory import tiny_esrgan, write_tiny_esrgan


def gradient(width=40, height=36) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


@pytest.mark.parametrize("name, old_layout", [("a.pth", True), ("b.pth", False), ("c.safetensors", False)])
def test_tiny_esrgan_file_loads_and_doubles_the_size(tmp_path, name, old_layout):
    path = write_tiny_esrgan(tmp_path / "ESRGAN" / name, scale=2, seed=4, old_layout=old_layout)
    model = upscalers.load_upscaler_model(path)
    assert model.scale == 2
    reference = tiny_esrgan(scale=2, seed=4)
    x = upscalers.image_to_tensor(gradient())
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    tool = upscalers.Upscalers(tmp_path, ModelCache(1 << 28), torch.device("cpu"))
    assert path.stem in tool.names() and "Latent" not in tool.names() and "Latent" in tool.names(latent=True)
    out = tool.upscale(gradient(), 80, 72, path.stem)
    assert out.size == (80, 72)
    assert np.asarray(out).std() > 0


def test_a_1x_model_runs_once_then_lanczos(tmp_path):
    write_tiny_esrgan(tmp_path / "ESRGAN" / "1x-denoise.pth", scale=1)
    tool = upscalers.Upscalers(tmp_path, ModelCache(1 << 26), torch.device("cpu"))
    assert tool.upscale(gradient(), 80, 72, "1x-denoise").size == (80, 72)


def test_x4_and_unshuffled_x2_layouts(tmp_path):
    path = write_tiny_esrgan(tmp_path / "RealESRGAN" / "x4.pth", scale=4, old_layout=True)
    assert upscalers.load_upscaler_model(path).scale == 4
    # Real-ESRGAN x2plus: pixel-unshuffle by 2, then the x4 body
    from pipelines.rrdb import RRDBNet, build_rrdb

    x2 = RRDBNet(12, 3, 8, 4, 1, upsamples=2, unshuffle=2)
    state = {k.replace("upconvs.0", "conv_up1").replace("upconvs.1", "conv_up2"): v for k, v in x2.state_dict().items()}
    model = build_rrdb(state)
    assert model.scale == 2
    assert model(torch.rand(1, 3, 8, 10)).shape == (1, 3, 16, 20)


def test_tiled_equals_untiled_away_from_seams():
    model = tiny_esrgan(scale=2, seed=1)
    image = gradient(70, 50)
    whole = np.asarray(upscalers.run_tiled(model, image, tile=0, overlap=0), dtype=float)
    tiled = np.asarray(upscalers.run_tiled(model, image, tile=24, overlap=20), dtype=float)
    assert tiled.shape == whole.shape == (100, 140, 3)
    assert np.abs(tiled - whole).max() <= 1  # rounding only: the overlap covers the receptive field
    no_overlap = np.asarray(upscalers.run_tiled(model, image, tile=24, overlap=0), dtype=float)
    assert np.abs(no_overlap - whole).max() > 1  # without overlap the seams show: the check can fail


def test_pixel_and_latent_modes():
    tool = upscalers.Upscalers("/nonexistent", ModelCache(1 << 20), torch.device("cpu"))
    image = gradient(20, 20)
    assert tool.upscale(image, 40, 40, "Nearest").tobytes() == image.resize((40, 40), Image.NEAREST).tobytes()
    assert tool.upscale(image, 40, 40, "Lanczos").tobytes() == image.resize((40, 40), Image.LANCZOS).tobytes()
    with pytest.raises(ValueError, match="not found"):
        tool.upscale(image, 40, 40, "4x-missing")
    latents = torch.randn(1, 4, 8, 8)
    for mode in upscalers.LATENT_MODES:
        assert upscalers.upscale_latents(latents, mode, 128, 96).shape == (1, 4, 16, 12)
    assert torch.equal(upscalers.upscale_latents(latents, "Latent (nearest)", 128, 128)[:, :, ::2, ::2], latents)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "ESRGAN" / "evil.pth"
    path.parent.mkdir()
    with open(path, "wb") as handle:
        pickle.dump({"model.0.weight": Evil()}, handle)
    with pytest.raises(ValueError, match="weights-only"):
        upscalers.load_upscaler_model(path)


def test_other_architectures_need_spandrel(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "DAT" / "dat.safetensors"
    path.parent.mkdir()
    save_file({"layers.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="spandrel|not an RRDB"):
        upscalers.load_upscaler_model(path)
