"""Upscalers: tiny ESRGAN files in the layouts real files use (original ESRGAN slots, BasicSR
names; .pth and .safetensors) give what an independent forward written here gives; other
architectures (Compact, SwinIR, DAT, HAT) load through spandrel (skipped without it); tiling
matches the untiled result away from seams; Lanczos/Nearest/latent modes; unsafe pickles are
refused."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from pipelines import upscalers
from pipelines.cache import ModelCache
from tests.upscaler_factory import (OLD_LAYOUT_SLOTS, tiny_esrgan, tiny_esrgan_state, write_tiny_compact,
                                    write_tiny_esrgan, write_tiny_swinir)


def gradient(width=40, height=36) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def spandrel_available() -> bool:
    return upscalers._spandrel_loader() is not None


def reference_esrgan(state: dict, x: torch.Tensor, scale: int) -> torch.Tensor:
    """ESRGAN's forward written out from the original-layout keys (x4: model.3/6/8/10), with no
    model class: first conv, RRDB trunk (3 dense blocks of 5 convs each, residuals scaled by 0.2),
    trunk conv, nearest x2 + conv + LeakyReLU per upsample, HR conv + LeakyReLU, last conv."""
    def conv(name, h):
        return F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    def lrelu(h):
        return F.leaky_relu(h, 0.2)

    blocks = sorted({int(k.split(".")[3]) for k in state if k.startswith("model.1.sub.") and ".RDB" in k})
    *up_slots, hr_slot, last_slot = OLD_LAYOUT_SLOTS[scale]
    first = conv("model.0", x)
    trunk = first
    for block in blocks:
        block_in = h = trunk
        for rdb in (1, 2, 3):
            features = [h]
            for j in (1, 2, 3, 4):
                features.append(lrelu(conv(f"model.1.sub.{block}.RDB{rdb}.conv{j}.0", torch.cat(features, 1))))
            h = conv(f"model.1.sub.{block}.RDB{rdb}.conv5.0", torch.cat(features, 1)) * 0.2 + h
        trunk = h * 0.2 + block_in
    h = first + conv(f"model.1.sub.{len(blocks)}", trunk)
    for slot in up_slots:
        h = lrelu(conv(f"model.{slot}", F.interpolate(h, scale_factor=2, mode="nearest")))
    return conv(f"model.{last_slot}", lrelu(conv(f"model.{hr_slot}", h)))


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_original_esrgan_layout_matches_an_independent_forward(tmp_path, scale):
    path = write_tiny_esrgan(tmp_path / "ESRGAN" / f"{scale}x-old.pth", scale=scale, seed=4, old_layout=True)
    state = torch.load(path, weights_only=True)
    convs = sorted({int(k.split(".")[1]) for k in state if k.count(".") == 2})
    assert convs == [0, *OLD_LAYOUT_SLOTS[scale]]  # x4: model.0, 3, 6, 8, 10 as in real files
    x = upscalers.image_to_tensor(gradient(20, 18))
    with torch.no_grad():
        expected = reference_esrgan(state, x, scale)
        assert 0.02 < expected.std() and (expected.clamp(0, 1) == expected).float().mean() > 0.9
        for use_spandrel in (True, False):  # spandrel when it imports, else (and always) the built-in path
            model = upscalers.load_upscaler_model(path, use_spandrel=use_spandrel)
            assert model.scale == scale
            torch.testing.assert_close(model(x).clamp(0, 1), expected.clamp(0, 1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["b.pth", "c.safetensors"])
def test_basicsr_layout_gives_the_same_model(tmp_path, name):
    new = write_tiny_esrgan(tmp_path / "ESRGAN" / name, scale=2, seed=4)
    old_state = tiny_esrgan_state(scale=2, seed=4, old_layout=True)  # the same random draws, old names
    x = upscalers.image_to_tensor(gradient())
    with torch.no_grad():
        expected = reference_esrgan(old_state, x, 2).clamp(0, 1)
        for use_spandrel in (True, False):
            model = upscalers.load_upscaler_model(new, use_spandrel=use_spandrel)
            torch.testing.assert_close(model(x).clamp(0, 1), expected, atol=1e-5, rtol=1e-4)
    tool = upscalers.Upscalers(tmp_path, ModelCache(1 << 28), torch.device("cpu"))
    assert new.stem in tool.names() and "Latent" not in tool.names() and "Latent" in tool.names(latent=True)
    out = tool.upscale(gradient(), 80, 72, new.stem)
    assert out.size == (80, 72)
    assert np.array_equal(np.asarray(out), np.asarray(upscalers.tensor_to_image(expected)))


def test_a_1x_model_runs_once_then_lanczos(tmp_path):
    write_tiny_esrgan(tmp_path / "ESRGAN" / "1x-denoise.pth", scale=1)
    tool = upscalers.Upscalers(tmp_path, ModelCache(1 << 26), torch.device("cpu"))
    assert tool.upscale(gradient(), 80, 72, "1x-denoise").size == (80, 72)


def test_unshuffled_x2_layout_builtin():
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


def test_without_spandrel_other_architectures_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "DAT" / "dat.safetensors"
    path.parent.mkdir()
    save_file({"layers.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="need the spandrel package"):
        upscalers.load_upscaler_model(path, use_spandrel=False)
    with pytest.raises(ValueError, match="spandrel"):  # without spandrel: the same; with it: unknown architecture
        upscalers.load_upscaler_model(path)


# --- spandrel (needs torchvision; skipped where it is missing) ---------------------------------

def _need_spandrel():
    pytest.importorskip("spandrel", reason="spandrel (needs torchvision) is not installed: non-RRDB upscalers")
    assert spandrel_available()


@pytest.mark.parametrize("folder, name, write, architecture", [
    ("RealESRGAN", "2x-compact.pth", write_tiny_compact, "RealESRGAN Compact"),
    ("SwinIR", "2x-swinir.safetensors", write_tiny_swinir, "SwinIR"),
    ("SwinIR", "4x-swinir.pth", write_tiny_swinir, "SwinIR"),
])
def test_other_architectures_load_through_spandrel_and_scale(tmp_path, folder, name, write, architecture):
    _need_spandrel()
    scale = int(name[0])
    path = write(tmp_path / folder / name, scale=scale, seed=3)
    model = upscalers.load_upscaler_model(path)
    assert isinstance(model, upscalers.SpandrelUpscaler)
    assert (model.architecture, model.scale) == (architecture, scale)
    tool = upscalers.Upscalers(tmp_path, ModelCache(1 << 28), torch.device("cpu"))
    assert path.stem in tool.names()
    image = gradient(20, 18)
    out = tool.upscale(image, 20 * scale, 18 * scale, path.stem)
    assert out.size == (20 * scale, 18 * scale)
    with torch.no_grad():
        direct = upscalers.tensor_to_image(model(upscalers.image_to_tensor(image)))
    assert out.tobytes() == direct.tobytes()  # exactly the factor: no Lanczos resize after the model
    assert np.abs(np.asarray(out, float) - np.asarray(image.resize(out.size, Image.LANCZOS), float)).mean() > 1


def tiny_dat(scale: int):
    """A tiny DAT (one group of two blocks; 32 channels: DAT's attention splits it by 2, 4 and 16)."""
    from spandrel.architectures.DAT import DAT

    return DAT(img_size=16, embed_dim=32, split_size=[2, 4], depth=[2], num_heads=[2], expansion_factor=2.0,
               upscale=scale)


def tiny_hat(scale: int):
    """A tiny HAT (one group of two blocks, window 4; squeeze 6 keeps its channel attention non-empty)."""
    from spandrel.architectures.HAT import HAT

    return HAT(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, compress_ratio=3,
               squeeze_factor=6, mlp_ratio=2.0, upscale=scale, num_feat=8)


@pytest.mark.parametrize("folder, name, build", [
    ("DAT", "2x-dat.safetensors", tiny_dat),
    ("DAT", "4x-dat.pth", tiny_dat),
    ("HAT", "2x-hat.safetensors", tiny_hat),
    ("HAT", "4x-hat.pth", tiny_hat),
])
def test_dat_and_hat_load_through_spandrel_and_match_their_own_forward(tmp_path, folder, name, build):
    """Built with spandrel's own classes, saved as real files are, loaded through Easel's loader:
    the upscale is exactly the built model's forward at its scale."""
    _need_spandrel()
    from tests.upscaler_factory import save_weights

    scale = int(name[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        built = build(scale).eval()  # eval: DAT has BatchNorm, both have drop-path
    path = save_weights(tmp_path / folder / name, built.state_dict())
    model = upscalers.load_upscaler_model(path)
    assert (model.architecture, model.scale) == (folder, scale)
    tool = upscalers.Upscalers(tmp_path, ModelCache(1 << 28), torch.device("cpu"))
    assert path.stem in tool.names()
    image = gradient(20, 18)  # not a multiple of the window / split sizes: the models pad inside
    out = tool.upscale(image, 20 * scale, 18 * scale, path.stem)
    assert out.size == (20 * scale, 18 * scale)
    with torch.no_grad():
        expected = built(upscalers.image_to_tensor(image))
    assert expected.shape[-2:] == (18 * scale, 20 * scale)
    assert out.tobytes() == upscalers.tensor_to_image(expected).tobytes()
    assert np.abs(np.asarray(out, float) - np.asarray(image.resize(out.size, Image.LANCZOS), float)).mean() > 1


def test_spandrel_model_tiled_equals_untiled_away_from_seams(tmp_path):
    _need_spandrel()
    model = upscalers.load_upscaler_model(write_tiny_compact(tmp_path / "RealESRGAN" / "c.pth", scale=2, seed=5))
    image = gradient(70, 50)
    whole = np.asarray(upscalers.run_tiled(model, image, tile=0, overlap=0), dtype=float)
    tiled = np.asarray(upscalers.run_tiled(model, image, tile=24, overlap=12), dtype=float)
    assert tiled.shape == whole.shape == (100, 140, 3)
    assert np.abs(tiled - whole).max() <= 1
    no_overlap = np.asarray(upscalers.run_tiled(model, image, tile=24, overlap=0), dtype=float)
    assert np.abs(no_overlap - whole).max() > 1


def test_spandrel_refuses_what_is_not_an_rgb_upscaler(tmp_path):
    _need_spandrel()
    from safetensors.torch import save_file

    path = tmp_path / "DAT" / "junk.safetensors"
    path.parent.mkdir()
    save_file({"layers.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="does not know this model's architecture"):
        upscalers.load_upscaler_model(path)
