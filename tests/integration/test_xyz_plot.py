"""The built-in X/Y/Z plot: every cell of the grid equals the single image generated with the
same settings (pixel for pixel), labels and infotext are there, and the UI handler saves the grid."""
import importlib
import types
import warnings

import numpy as np
import pytest
from PIL import Image

import app
from extensions.loader import load_extensions
from pipelines.generate import generate
from pipelines.metadata import parse_infotext, read_infotext
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests import factories

BASE = dict(prompt="a red circle on a blue background", negative_prompt="no red", width=64, height=64,
            steps=2, cfg_scale=5, sampler="Euler", checkpoint="tinyA.safetensors", seed=42, save_images=False)


@pytest.fixture(scope="module")
def xyz(tmp_path_factory):
    exts = load_extensions(app.BUILTIN_EXTENSIONS_DIR, tmp_path_factory.mktemp("none"))
    assert exts.find("xyz-plot").loaded, exts.find("xyz-plot").error
    return (importlib.import_module("easel_ext_xyz_plot.axes"), importlib.import_module("easel_ext_xyz_plot.plot"))


def test_axis_values_are_parsed_like_a1111(xyz):
    axes, _plot = xyz
    assert axes.parse_ints("1-3, 10-30 (+10), 1-10 [4], -1, 5-3") == [1, 2, 3, 10, 20, 30, 1, 4, 7, 10, -1, 5, 4, 3]
    assert axes.parse_floats("1.5-3 (+0.5), 7, 2-3 [3]") == [1.5, 2.0, 2.5, 3.0, 7.0, 2.0, 2.5, 3.0]
    assert axes.split_values('Euler, "DPM++ 2M, Karras" ,DDIM') == ["Euler", "DPM++ 2M, Karras", "DDIM"]
    base = GenerationRequest(**BASE)
    with pytest.raises(ValueError, match="cannot read 'ten'"):
        axes.make_axis("Steps", "1, ten", base)
    with pytest.raises(ValueError, match="first value 'purple' is not in the prompt"):
        axes.make_axis("Prompt S/R", "purple, green", base)
    with pytest.raises(ValueError, match="no <lora:name:weight> tag"):
        axes.make_axis("LoRA weight", "0, 1", base)
    lora = axes.make_axis("LoRA weight", "0, 0.5", base.with_changes(prompt="x <lora:style:1> <lora:b:0.2:0.1>"))
    assert lora.type.apply(base.with_changes(prompt="x <lora:style:1> <lora:b:0.2:0.1>"), 0.5).prompt == \
        "x <lora:style:0.5> <lora:b:0.5:0.1>"
    with pytest.raises(ValueError, match="Unknown sampler 'Nope'"):  # every cell is checked before any runs
        xyz[1].plan_cells(base, [axes.make_axis("Sampler", "Euler, Nope", base)])


def test_grid_cells_equal_single_generations(engine, xyz):
    axes, plot = xyz
    manager, _ = engine
    base = GenerationRequest(**BASE)
    x = axes.make_axis("Steps", "1, 2", base)
    y = axes.make_axis("Prompt S/R", "red circle, green square", base)
    z = axes.make_axis("Checkpoint", "tinyA.safetensors, sub/tinyB.safetensors", base)
    result = plot.run_plot(base, [x, y, z], lambda r: generate(manager, None, r))
    assert len(result.grids) == 2 and len(result.results) == 8

    for zi, checkpoint in enumerate(["tinyA.safetensors", "sub/tinyB.safetensors"]):
        grid = result.grids[zi]
        assert grid.z_label == f"Checkpoint: {checkpoint}"
        for yi, prompt in enumerate([BASE["prompt"], "a green square on a blue background"]):
            for xi, steps in enumerate([1, 2]):
                single = generate(manager, None, GenerationRequest(**{**BASE, "steps": steps, "prompt": prompt,
                                                                      "checkpoint": checkpoint})).images[0]
                cell = grid.image.crop(grid.boxes[(xi, yi)])
                assert np.array_equal(np.asarray(cell), np.asarray(single)), (zi, yi, xi)
        # label bands hold text (dark pixels) above and left of the cells
        left, top = grid.boxes[(0, 0)][:2]
        labels = np.asarray(grid.image.convert("L"))
        assert top > 0 and left > 0 and labels[:top].min() < 128 and labels[top:, :left].min() < 128
    fields = parse_infotext(result.grids[0].infotext)
    assert (fields["X Type"], fields["X Values"]) == ("Steps", "1, 2")
    assert (fields["Y Type"], fields["Y Values"]) == ("Prompt S/R", "red circle, green square")
    assert fields["Z Type"] == "Checkpoint" and str(fields["Seed"]) == "42" and fields["Script"] == "X/Y/Z plot"


def test_random_seed_is_fixed_once_for_all_cells(engine, xyz):
    axes, plot = xyz
    base = GenerationRequest(**{**BASE, "seed": -1})
    cells = plot.plan_cells(base, [axes.make_axis("CFG Scale", "3, 5-7 [2]", base)])
    assert [c.request.cfg_scale for c in cells] == [3.0, 5.0, 7.0]
    assert len({c.request.seed for c in cells}) == 1 and cells[0].request.seed != -1
    seeds = plot.plan_cells(base, [axes.make_axis("Seed", "1-3", base)])
    assert [c.request.seed for c in seeds] == [1, 2, 3]


def test_the_txt2img_accordion_handler_saves_a_grid_with_infotext(tmp_path):
    factories.write_tiny_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blocks, ctx = app.build_app(Settings(data_dir=tmp_path))
    # Gradio recognised the handler's gr.Request parameter (else it warns and would not inject it)
    assert not [w for w in caught if "make_grid" in str(w.message)]
    try:
        handlers = [f for f in blocks.fns.values() if f.name == "make_grid"]
        assert len(handlers) == 2  # txt2img's accordion (built first) and img2img's
        handler = handlers[0]
        form = {"prompt": "a cat", "negative_prompt": "", "sampler": "Euler", "schedule": "Automatic",
                "steps": 1, "cfg_scale": 5, "width": 64, "height": 64, "seed": 7, "batch_count": 1,
                "batch_size": 1, "checkpoint": "tiny.safetensors", "vae": "Automatic"}
        values = form | {"xyz_x_type": "Steps", "xyz_x_values": "1, 2", "xyz_y_type": "Nothing", "xyz_y_values": "",
                         "xyz_z_type": "Nothing", "xyz_z_values": "", "xyz_save": True}
        items, infotext = handler.fn(request=types.SimpleNamespace(username=None, session_hash="t"), **values)
        assert len(items) == 1
        path = items[0][0]
        assert "txt2img-grids" in path
        with Image.open(path) as saved:
            assert read_infotext(saved) == infotext and saved.size[0] >= 128
        assert "X Type: Steps" in infotext and "Seed: 7" in infotext
        # the cells were saved as ordinary images too, like A1111 (the form saves images)
        assert len(list((tmp_path / "outputs" / "txt2img-images").rglob("*.png"))) == 2
    finally:
        ctx.jobs.stop()


@pytest.mark.slow
def test_lora_weight_axis_cells_equal_single_generations_with_that_weight(xyz, tmp_path):
    from tests.integration.conftest import make_engine

    axes, plot = xyz
    root = tmp_path / "models-root"
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    factories.write_tiny_lora(root / "models" / "Lora" / "style.safetensors", seed=3)
    (root / "embeddings").mkdir()
    manager, _ = make_engine(root, tmp_path / "data")
    base = GenerationRequest(**{**BASE, "checkpoint": "tiny.safetensors", "prompt": "a cat <lora:style:1>"})
    result = plot.run_plot(base, [axes.make_axis("LoRA weight", "0, 1", base)], lambda r: generate(manager, None, r))
    grid = result.grids[0]
    cells = [np.asarray(grid.image.crop(grid.boxes[(x, 0)])) for x in range(2)]
    for x, weight in enumerate(["0", "1"]):
        single = generate(manager, None, base.with_changes(prompt=f"a cat <lora:style:{weight}>")).images[0]
        assert np.array_equal(cells[x], np.asarray(single))
    assert np.abs(cells[0].astype(int) - cells[1].astype(int)).max() > 8  # the LoRA weight mattered


def test_size_clip_skip_hires_and_request_field_axes_parse_and_check(xyz):
    axes, _plot = xyz
    base = GenerationRequest(**BASE)
    assert axes.make_axis("Width", "64-128 (+32)", base).values == (64, 96, 128)
    assert axes.make_axis("Clip skip", "1, 2", base).type.apply(base, 2).clip_skip == 2
    with pytest.raises(ValueError, match="tick Hires fix first"):
        axes.make_axis("Hires steps", "1, 2", base)
    hires = base.with_changes(enable_hr=True, hr_scale=1.5)
    assert axes.make_axis("Hires denoise", "0.3, 0.6", hires).type.apply(hires, 0.3).denoising_strength == 0.3
    assert axes.make_axis("Hires steps", "3", hires).type.apply(hires, 3).hr_second_pass_steps == 3

    field = axes.make_axis("Request field", 'hr_scale: 1.5, 2', base)
    assert field.values == (1.5, 2.0) and field.labels() == ["hr_scale: 1.5", "hr_scale: 2"]
    assert axes.make_axis("Request field", "enable_hr: yes, off", base).values == (True, False)
    assert axes.make_axis("Request field", 'negative_prompt: blur, "dark, grainy"', base).values == \
        ("blur", "dark, grainy")
    assert axes.make_axis("Request field", "checkpoint: a, b", base).values == ("a", "b")  # None default: text
    for text, message in [("colour: red", "'colour' is not a request field"),
                          ("init_image: x", "'init_image' is not a request field"),
                          ("additions: x", "'additions' is not a request field"),
                          ("steps 1, 2", "write the field name, a colon"),
                          ("steps: 1, many", "cannot read 'many'"),
                          ("enable_hr: maybe", "cannot read 'maybe' as true/false"),
                          ("steps:", "the steps axis has no values")]:
        with pytest.raises(ValueError, match=message):
            axes.make_axis("Request field", text, base)


def test_sampler_and_request_field_axes_cells_equal_single_generations(engine, xyz):
    axes, plot = xyz
    manager, _ = engine
    base = GenerationRequest(**BASE)
    x = axes.make_axis("Sampler", "Euler, DDIM", base)
    y = axes.make_axis("Request field", 'negative_prompt: no red, "blurry, dark"', base)
    result = plot.run_plot(base, [x, y], lambda r: generate(manager, None, r))
    grid = result.grids[0]
    cells = {}
    for yi, negative in enumerate(["no red", "blurry, dark"]):
        for xi, sampler in enumerate(["Euler", "DDIM"]):
            single = generate(manager, None, base.with_changes(sampler=sampler, negative_prompt=negative)).images[0]
            cells[xi, yi] = np.asarray(grid.image.crop(grid.boxes[(xi, yi)]))
            assert np.array_equal(cells[xi, yi], np.asarray(single)), (xi, yi)
    assert not np.array_equal(cells[0, 0], cells[1, 0]) and not np.array_equal(cells[0, 0], cells[0, 1])
    fields = parse_infotext(grid.infotext)
    assert (fields["X Type"], fields["Y Type"], fields["Y Values"]) == ("Sampler", "negative_prompt", "no red, blurry, dark")


def test_width_axis_cells_of_different_sizes_equal_single_generations(engine, xyz):
    axes, plot = xyz
    manager, _ = engine
    base = GenerationRequest(**{**BASE, "steps": 1})
    result = plot.run_plot(base, [axes.make_axis("Width", "64, 96", base)], lambda r: generate(manager, None, r))
    grid = result.grids[0]
    for xi, width in enumerate([64, 96]):
        single = generate(manager, None, base.with_changes(width=width)).images[0]
        box = grid.boxes[(xi, 0)]
        assert (box[2] - box[0], box[3] - box[1]) == (width, 64)
        assert np.array_equal(np.asarray(grid.image.crop(box)), np.asarray(single))
