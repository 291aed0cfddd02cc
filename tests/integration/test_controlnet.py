"""ControlNet on tiny-world: a ControlNet built from tiny-world's own UNet (random, non-zero
zero-convs) loads from a single file in both key layouts and steers generation as the weight,
guidance range and control mode say. Compared against the model's own output without control."""
import re

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.torch import save_file
import torch

from pipelines.control import ControlUnit, units_from_infotext
from pipelines.control.apply import attach
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationRequest
from pipelines.settings import BUILTIN_MODELS_DIR
from tests.control_factories import (controlnet_to_ldm, tiny_controlnet, tiny_t2i_adapter, write_controlnet,
                                     write_t2i_adapter, write_tiny_gligen, write_tiny_ip_adapter)
from tests.integration.conftest import make_engine


@pytest.fixture(scope="module")
def control_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    manager, outputs = make_engine(root, root / "data", builtin_dir=BUILTIN_MODELS_DIR)
    with manager.pipeline("txt2img", None) as active:
        unet = active.pipe.unet
        text_hidden = active.pipe.text_encoder.config.hidden_size
    folder = root / "models" / "ControlNet"
    canny = tiny_controlnet(unet, seed=1)
    write_controlnet(folder / "control_tiny_canny.safetensors", canny, layout="ldm")
    write_controlnet(folder / "diffusers_tiny_other.safetensors", tiny_controlnet(unet, seed=2), layout="diffusers")
    # An SDXL ControlNet as the registry sees it: cross-attention 2048 wide (header is enough).
    save_file({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 2048)},
              str(folder / "diffusers_xl_canny_mid.safetensors"))
    write_tiny_ip_adapter(root / "models", unet)
    write_tiny_gligen(root / "models", unet, text_hidden)
    write_t2i_adapter(folder / "t2iadapter_tiny_sketch.safetensors", tiny_t2i_adapter(unet, seed=5))
    write_t2i_adapter(folder / "t2iadapter_tiny_canny_original.safetensors",
                      tiny_t2i_adapter(unet, seed=6, in_channels=1), layout="original")
    # the same weights as control_tiny_canny, as a weights-only torch.save of the LDM state dict
    torch.save(controlnet_to_ldm(canny), folder / "control_tiny_canny_pth.pth")
    # an IP-Adapter with its image encoder in models/ControlNet (A1111 extension users keep them there)
    write_tiny_ip_adapter(root / "models", unet, name="ip-adapter_cn.safetensors", seed=3, folder="ControlNet")
    manager.registry.refresh()
    return manager


def square(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((16, 16, size - 17, size - 17), fill="white")
    return image


BASE = GenerationRequest(prompt="a red square on a blue background", width=64, height=64, steps=4, cfg_scale=5,
                         seed=3, save_images=False)
UNIT = ControlUnit(module="canny", model="control_tiny_canny", image=square())


def run(manager, *units, **changes):
    result = generate(manager, None, BASE.with_changes(control_units=tuple(units), **changes))
    return np.asarray(result.images[0]).astype(np.float64), result.infotexts[0]


@pytest.fixture(scope="module")
def baseline(control_engine):
    return run(control_engine)[0]


@pytest.fixture(scope="module")
def full(control_engine):
    return run(control_engine, UNIT)


def distance(a, b) -> float:
    return float(np.abs(a - b).mean())


def test_weight_zero_equals_no_controlnet_pixel_for_pixel(control_engine, baseline):
    zero, _ = run(control_engine, UNIT.with_changes(weight=0))
    assert np.array_equal(zero, baseline)


def test_weight_one_changes_the_image_and_writes_infotext(control_engine, baseline, full):
    image, infotext = full
    assert distance(image, baseline) > 5
    assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny [' in infotext
    assert "Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200" in infotext
    assert 'Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced"' in infotext


def test_guidance_end_half_lies_between_off_and_full(control_engine, baseline, full):
    half, _ = run(control_engine, UNIT.with_changes(guidance_end=0.5))
    whole = distance(full[0], baseline)
    assert 0 < distance(half, baseline) < whole
    assert 0 < distance(half, full[0]) < whole



def test_guidance_start_half_lies_between_and_the_first_half_runs_without_control(control_engine, baseline, full):
    request = BASE.with_changes(control_units=(UNIT,))
    with control_engine.pipeline("txt2img", None) as active, attach(control_engine, active, request) as (joined, _):
        net = joined.pipe.controlnet.nets[0]  # the cached net the next generation uses too
    scales = []
    # diffusers still calls a net outside its range, at scale 0: record the scale each step got
    handle = net.register_forward_hook(lambda _m, _args, kwargs, _out: scales.append(float(kwargs["conditioning_scale"])),
                                       with_kwargs=True)
    try:
        late, _ = run(control_engine, UNIT.with_changes(guidance_start=0.5))
    finally:
        handle.remove()
    assert scales == [0.0, 0.0, 1.0, 1.0]  # 4 steps, one CFG batch each: off, off, on, on
    whole = distance(full[0], baseline)
    assert 0 < distance(late, baseline) < whole and distance(late, full[0]) > 1


def test_two_units_combine(control_engine, baseline, full):
    other = ControlUnit(module="none", model="diffusers_tiny_other", image=square())
    alone, _ = run(control_engine, other)
    both, infotext = run(control_engine, UNIT, other)
    assert distance(both, full[0]) > 1 and distance(both, alone) > 1
    assert "ControlNet 0: " in infotext and "ControlNet 1: " in infotext
    # a disabled unit takes no part
    disabled, _ = run(control_engine, UNIT, other.with_changes(enabled=False))
    assert np.array_equal(disabled, full[0])


def test_control_modes_differ(control_engine, full):
    prompt_more, _ = run(control_engine, UNIT.with_changes(control_mode="My prompt is more important"))
    control_more, _ = run(control_engine, UNIT.with_changes(control_mode=2))
    assert distance(prompt_more, full[0]) > 1
    assert distance(control_more, full[0]) > 1 and distance(control_more, prompt_more) > 1


def test_img2img_and_inpaint_with_controlnet(control_engine):
    init = Image.new("RGB", (64, 64), (40, 80, 200))
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((8, 8, 55, 55), fill=255)
    for task, extra in (("img2img", {}), ("inpaint", {"mask": mask})):
        changes = dict(task=task, init_image=init, denoising_strength=0.8, **extra)
        off, _ = run(control_engine, **changes)
        on, infotext = run(control_engine, UNIT.with_changes(image=None), **changes)  # the init image stands in
        assert distance(on, off) > 1, task
        assert "ControlNet 0" in infotext


def test_sdxl_controlnet_with_sd1_class_checkpoint_is_refused(control_engine):
    unit = UNIT.with_changes(model="diffusers_xl_canny_mid")
    with pytest.raises(ValueError, match="is for SDXL, but the checkpoint .* is tiny-world: pick a tiny-world"):
        run(control_engine, unit)
    assert control_engine.load_counts["controlnet"] <= 2  # nothing was loaded for it


def test_controlnet_stays_cached_and_base_pipeline_clean(control_engine, baseline, full):  # full: loaded once
    loads = control_engine.load_counts["controlnet"]
    run(control_engine, UNIT)
    assert control_engine.load_counts["controlnet"] == loads
    assert np.array_equal(run(control_engine)[0], baseline)
    # never a second copy of the base model: the control pipeline holds the base's own modules,
    # and the cached ControlNet object itself
    request = BASE.with_changes(control_units=(UNIT,))
    with control_engine.pipeline("txt2img", None) as active:
        with attach(control_engine, active, request) as (joined, _kwargs):
            first = joined.pipe
            assert first is not active.pipe
            for name in ("unet", "vae", "text_encoder"):
                assert getattr(first, name) is getattr(active.pipe, name), name
            net = first.controlnet.nets[0]
        with attach(control_engine, active, request) as (again, _kwargs):
            assert again.pipe.controlnet.nets[0] is net
        assert not hasattr(active.pipe, "controlnet")
    assert control_engine.load_counts["controlnet"] == loads


def test_missing_image_and_unknown_model_are_clear(control_engine):
    with pytest.raises(ValueError, match="has no input image"):
        run(control_engine, UNIT.with_changes(image=None))
    with pytest.raises(ValueError):
        run(control_engine, UNIT.with_changes(model="no_such_controlnet"))


# --- IP-Adapter ------------------------------------------------------------------------------

IP_UNIT = ControlUnit(model="ip-adapter_tiny", image=square())


def test_ip_adapter_changes_the_image_and_leaves_the_unet_as_it_was(control_engine, baseline):
    on, infotext = run(control_engine, IP_UNIT)
    assert distance(on, baseline) > 1
    assert 'ControlNet 0: "Module: none, Model: ip-adapter_tiny [' in infotext
    zero, _ = run(control_engine, IP_UNIT.with_changes(weight=0))
    assert np.array_equal(zero, baseline)  # scale 0: the image branch adds exact zeros
    assert np.array_equal(run(control_engine)[0], baseline)  # processors and encoder_hid_proj restored


def test_ip_adapter_combines_with_a_controlnet(control_engine, full):
    both, infotext = run(control_engine, UNIT, IP_UNIT)
    assert distance(both, full[0]) > 1 and "ControlNet 1" in infotext


def test_ip_adapter_refuses_a_guidance_range(control_engine):
    with pytest.raises(ValueError, match="IP-Adapter units run over all steps"):
        run(control_engine, IP_UNIT.with_changes(guidance_end=0.5))


def test_ip_adapter_without_image_encoder_says_where_to_put_it(tmp_path):
    from pipelines.control.ip_adapter import find_image_encoder

    with pytest.raises(ValueError, match=r"ipadapter/image_encoder"):
        find_image_encoder(tmp_path / "models")


# --- T2I-Adapter -----------------------------------------------------------------------------

T2I_UNIT = ControlUnit(module="canny", model="t2iadapter_tiny_sketch", image=square())


def test_t2i_adapter_weight_guidance_and_layouts(control_engine, baseline):
    on, infotext = run(control_engine, T2I_UNIT)
    assert distance(on, baseline) > 1 and "ControlNet 0" in infotext
    zero, _ = run(control_engine, T2I_UNIT.with_changes(weight=0))
    assert np.array_equal(zero, baseline)
    half, _ = run(control_engine, T2I_UNIT.with_changes(guidance_end=0.5))
    assert 0 < distance(half, baseline) < distance(on, baseline) + 1e-9
    # the original TencentARC layout with a one-channel (canny) input, and two adapters at once
    original, _ = run(control_engine, T2I_UNIT.with_changes(model="t2iadapter_tiny_canny_original"))
    assert distance(original, baseline) > 1 and distance(original, on) > 1
    both, _ = run(control_engine, T2I_UNIT, T2I_UNIT.with_changes(model="t2iadapter_tiny_canny_original"))
    assert distance(both, on) > 1 and distance(both, original) > 1


def test_t2i_adapter_in_img2img(control_engine):
    init = Image.new("RGB", (64, 64), (200, 60, 40))
    changes = dict(task="img2img", init_image=init, denoising_strength=0.8)
    off, _ = run(control_engine, **changes)
    on, _ = run(control_engine, T2I_UNIT, **changes)
    assert distance(on, off) > 1


def test_t2i_adapter_and_controlnet_together_are_refused(control_engine):
    with pytest.raises(ValueError, match="cannot run in the same generation"):
        run(control_engine, UNIT, T2I_UNIT)


# --- GLIGEN ----------------------------------------------------------------------------------

GLIGEN = dict(gligen_model="gligen_tiny", gligen_boxes=(("a red square", 0.1, 0.1, 0.6, 0.6),))


def test_gligen_boxes_change_the_image_and_leave_the_unet_clean(control_engine, baseline):
    on, infotext = run(control_engine, **GLIGEN)
    assert distance(on, baseline) > 1
    assert "GLIGEN: gligen_tiny" in infotext and "GLIGEN boxes: a red square 0.1 0.1 0.6 0.6" in infotext
    moved, _ = run(control_engine, gligen_model="gligen_tiny", gligen_boxes="a red square: 0.4, 0.4, 0.9, 0.9")
    assert distance(moved, on) > 0.1  # the box position matters (same seed, only the box moved)
    assert np.array_equal(run(control_engine)[0], baseline)  # fusers and position net removed
    with control_engine.pipeline("txt2img", None) as active:
        assert not hasattr(active.pipe.unet, "position_net")


def test_gligen_with_ip_adapter_and_bad_boxes(control_engine, baseline):
    both, _ = run(control_engine, IP_UNIT, **GLIGEN)
    assert distance(both, baseline) > 1
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        BASE.with_changes(gligen_boxes=(("cat", 0.5, 0.1, 0.2, 0.6),))
    with pytest.raises(ValueError, match="need a GLIGEN model"):
        run(control_engine, gligen_boxes=GLIGEN["gligen_boxes"])
    with pytest.raises(ValueError, match="cannot run together"):
        run(control_engine, UNIT, **GLIGEN)


# --- SDXL ------------------------------------------------------------------------------------

def test_controlnet_on_a_tiny_sdxl_checkpoint(tmp_path, control_engine):
    """The SDXL ControlNet pipelines (text_time embedding reaches the ControlNet) through the
    same code: a ControlNet made from a tiny SDXL UNet, saved as a diffusers folder."""
    from tests import factories

    factories.write_tiny_sdxl_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tinyxl", seed=0)
    manager, _ = make_engine(tmp_path, tmp_path / "data")
    with manager.pipeline("txt2img", "tinyxl") as active:
        assert active.arch.is_sdxl
        vae_steps = len(active.pipe.vae.config.block_out_channels)  # this tiny VAE downsamples once
        controlnet = tiny_controlnet(active.pipe.unet, seed=2, hint=(16, 32, 96, 256)[:vae_steps])
    controlnet.save_pretrained(tmp_path / "models" / "ControlNet" / "tinyxl_canny")
    # a tiny-world ControlNet: the same context width (64), but no SDXL size/time embedding
    with control_engine.pipeline("txt2img", None) as active:
        tiny_controlnet(active.pipe.unet, seed=1).save_pretrained(tmp_path / "models" / "ControlNet" / "tw_canny")
    manager.registry.refresh()
    request = BASE.with_changes(checkpoint="tinyxl", steps=3)
    off = np.asarray(generate(manager, None, request).images[0]).astype(float)
    unit = UNIT.with_changes(model="tinyxl_canny")
    on = np.asarray(generate(manager, None, request.with_changes(control_units=(unit,))).images[0]).astype(float)
    zero = np.asarray(generate(manager, None, request.with_changes(
        control_units=(unit.with_changes(weight=0),))).images[0]).astype(float)
    assert distance(on, off) > 1 and np.array_equal(zero, off)
    # the SD1-class tiny-world ControlNet does not fit this UNet: refused after loading
    with pytest.raises(ValueError, match="pick a ControlNet made for its base model"):
        generate(manager, None, request.with_changes(control_units=(unit.with_changes(model="tw_canny"),)))


# --- loading, pasting, control maps (after the load-count checks above) ------------------------

def test_pth_controlnet_loads_and_matches_its_safetensors_twin(control_engine, full):
    image, infotext = run(control_engine, UNIT.with_changes(model="control_tiny_canny_pth"))
    assert np.array_equal(image, full[0])
    assert 'Model: control_tiny_canny_pth [' in infotext


def test_pasted_ip_adapter_unit_generates_the_same_image(control_engine):
    first, infotext = run(control_engine, IP_UNIT)
    (pasted,) = units_from_infotext(parse_infotext(infotext))
    assert re.fullmatch(r"ip-adapter_tiny \[[0-9a-f]{8}\]", pasted.model)
    again, _ = run(control_engine, pasted.with_changes(image=square()))  # infotext carries no image
    assert np.array_equal(again, first)
    # a renamed file is still found by the hash of the title
    renamed = pasted.with_changes(model="ip-adapter_old_name " + pasted.model.split(" ", 1)[1], image=square())
    assert np.array_equal(run(control_engine, renamed)[0], first)


def test_ip_adapter_and_image_encoder_in_the_controlnet_folder(control_engine, baseline):
    on, infotext = run(control_engine, IP_UNIT.with_changes(model="ip-adapter_cn"))
    assert distance(on, baseline) > 1 and "Model: ip-adapter_cn [" in infotext
    encoder = control_engine.registry.paths.models_dir / "ControlNet" / "image_encoder"
    assert ("image_encoder", str(encoder)) in control_engine.cache.keys()


def test_gligen_in_img2img(control_engine):
    changes = dict(task="img2img", init_image=Image.new("RGB", (64, 64), (40, 80, 200)), denoising_strength=0.8)
    off, _ = run(control_engine, **changes)
    on, infotext = run(control_engine, **changes, **GLIGEN)
    assert distance(on, off) > 0.1 and "GLIGEN boxes: a red square 0.1 0.1 0.6 0.6" in infotext
    assert np.array_equal(run(control_engine, **changes)[0], off)  # nothing left grafted


def control_map(manager, unit, **changes) -> np.ndarray:
    """The control image generation hands the pipeline for `unit`."""
    request = BASE.with_changes(control_units=(unit,), **changes)
    with manager.pipeline(request.task, None) as active, attach(manager, active, request) as (_pipe, kwargs):
        return np.asarray(kwargs["image" if request.task == "txt2img" else "control_image"][0].convert("RGB"))


def bands() -> Image.Image:
    """128x64: red | green | blue columns (32, 64, 32 wide) under an 8-row white top band."""
    image = Image.new("RGB", (128, 64), (0, 255, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 31, 63), fill=(255, 0, 0))
    draw.rectangle((96, 0, 127, 63), fill=(0, 0, 255))
    draw.rectangle((0, 0, 127, 7), fill=(255, 255, 255))
    return image


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.mark.parametrize("mode, expected", [
    ("Just Resize", {(32, 8): RED, (32, 32): GREEN, (32, 56): BLUE, (4, 32): WHITE, (12, 32): GREEN}),
    ("Crop and Resize", {(32, 8): GREEN, (32, 56): GREEN, (4, 32): WHITE, (12, 32): GREEN}),
    ("Resize and Fill", {(32, 8): RED, (32, 56): BLUE, (12, 32): WHITE, (52, 32): GREEN}),
])
def test_each_resize_mode_shapes_the_map_the_pipeline_gets(control_engine, mode, expected):
    got = control_map(control_engine, UNIT.with_changes(module="none", image=bands(), resize_mode=mode))
    assert got.shape == (64, 64, 3)
    for (y, x), colour in expected.items():
        assert np.abs(got[y, x].astype(int) - colour).max() <= 8, (mode, y, x, got[y, x])


def test_pixel_perfect_runs_the_preprocessor_at_the_generation_size(control_engine):
    source = square(128)
    exact = cv2.Canny(np.asarray(source), 100, 200)
    perfect = control_map(control_engine, UNIT.with_changes(image=source, pixel_perfect=True, processor_res=64),
                          width=128, height=128)
    assert perfect.shape == (128, 128, 3) and np.array_equal(perfect[..., 0], exact)
    coarse = control_map(control_engine, UNIT.with_changes(image=source, processor_res=64), width=128, height=128)
    assert coarse.shape == perfect.shape and not np.array_equal(coarse, perfect)  # 64 px edges, upscaled


def test_a_unit_type_that_does_not_match_its_model_is_refused(control_engine, full):
    with pytest.raises(ValueError, match="control_tiny_canny.safetensors is a ControlNet model, but the unit's "
                                         "type is IP-Adapter"):
        run(control_engine, UNIT.with_changes(unit_type="IP-Adapter"))
    assert np.array_equal(run(control_engine, UNIT.with_changes(unit_type="ControlNet"))[0], full[0])


# --- inpaint with the other unit kinds ----------------------------------------------------------

def gradient() -> Image.Image:
    """An init image with no two rows alike, so a pixel left untouched is recognisable."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([ramp[:, None].repeat(64, 1), ramp[None, :].repeat(64, 0),
                                     np.full((64, 64), 120, np.uint8)], axis=-1))


@pytest.mark.parametrize("units, extra", [((T2I_UNIT,), {}), ((IP_UNIT,), {}), ((), GLIGEN)],
                         ids=["t2i-adapter", "ip-adapter", "gligen"])
def test_other_unit_kinds_in_inpaint_change_the_masked_area_only(control_engine, units, extra):
    init = gradient()
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    inside = np.asarray(mask) > 0
    changes = dict(task="inpaint", init_image=init, mask=mask, mask_blur=0, denoising_strength=0.8)
    off, _ = run(control_engine, **changes)
    on, _ = run(control_engine, *units, **changes, **extra)
    assert distance(on[inside], off[inside]) > 0.1
    # outside the mask both keep the init image pixel for pixel (the A1111 overlay)
    original = np.asarray(init).astype(np.float64)
    assert np.array_equal(on[~inside], original[~inside]) and np.array_equal(off[~inside], original[~inside])
