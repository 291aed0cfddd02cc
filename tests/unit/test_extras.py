"""Extras: upscale by a factor or to a size, two-upscaler blend, the source's parameters kept with
A1111's postprocessing text, batch folders only inside the data dir."""
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from pipelines import extras, upscalers
from pipelines.cache import ModelCache
from pipelines.outputs import OutputStore
from tests.upscaler_factory import write_tiny_esrgan


def source_image(path=None) -> Image.Image:
    y, x = np.mgrid[0:30, 0:40]
    image = Image.fromarray(np.stack([x * 6, y * 8, (x * y) % 256], -1).astype(np.uint8), "RGB")
    if path is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "a cat\nSteps: 4, Sampler: Euler, Seed: 5, Size: 40x30")
        image.save(path, pnginfo=info)
    return image


@pytest.fixture
def tool(tmp_path):
    write_tiny_esrgan(tmp_path / "models" / "ESRGAN" / "2x-tiny.pth", scale=2)
    return upscalers.Upscalers(tmp_path / "models", ModelCache(1 << 26), torch.device("cpu"))


def test_single_image_keeps_parameters_and_adds_postprocessing(tmp_path, tool):
    source = source_image(tmp_path / "in.png")
    outputs = OutputStore(tmp_path / "outputs")
    [image] = list(extras.open_images([tmp_path / "in.png"]))
    result, text, path = extras.process_one(tool, outputs, image, extras.ExtrasOptions(upscaling_resize=2))
    assert result.size == (80, 60)
    assert result.tobytes() == source.resize((80, 60), Image.LANCZOS).tobytes()
    assert text == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert path.parent.parent.name == "extras-images"
    with Image.open(path) as saved:
        saved.load()
        assert saved.info["parameters"].startswith("a cat\nSteps: 4")
        assert saved.info["postprocessing"] == text


def test_model_upscaler_blend_and_resize_to(tool):
    image = source_image()
    options = extras.ExtrasOptions(upscaler_1="2x-tiny", upscaler_2="Nearest", extras_upscaler_2_visibility=0.25)
    blended, info = extras.upscale(tool, image, options)
    first = tool.upscale(image, 80, 60, "2x-tiny")
    second = image.resize((80, 60), Image.NEAREST)
    assert blended.tobytes() == Image.blend(first, second, 0.25).tobytes()
    assert info["Postprocess upscaler 2"] == "Nearest" and info["Postprocess upscaler 2 visibility"] == 0.25
    fitted, _ = extras.upscale(tool, image, extras.ExtrasOptions(resize_mode=1, upscaling_resize_w=64,
                                                                 upscaling_resize_h=64, upscaling_crop=True))
    assert fitted.size == (64, 64)
    uncropped, _ = extras.upscale(tool, image, extras.ExtrasOptions(resize_mode="to", upscaling_resize_w=64,
                                                                    upscaling_resize_h=64, upscaling_crop=False))
    assert uncropped.size == (85, 64)  # covers the box, aspect kept
    with pytest.raises(ValueError, match="latent"):
        extras.ExtrasOptions(upscaler_1="Latent")
    with pytest.raises(ValueError, match="larger than"):
        extras.upscale(tool, Image.new("RGB", (2000, 2000)), extras.ExtrasOptions(upscaling_resize=8))


def test_batch_folder_must_be_inside_the_data_dir(tmp_path):
    data = tmp_path / "data"
    (data / "inputs").mkdir(parents=True)
    source_image(data / "inputs" / "a.png")
    source_image(data / "inputs" / "b.png")
    (data / "inputs" / "notes.txt").write_text("not an image")
    assert [p.name for p in extras.batch_folder_images("inputs", data)] == ["a.png", "b.png"]
    assert len(extras.batch_folder_images(data / "inputs", data)) == 2
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    source_image(outside / "c.png")
    for bad in (str(outside), "../elsewhere", "inputs/../../elsewhere", "/etc"):
        with pytest.raises(ValueError, match="inside the data folder"):
            extras.batch_folder_images(bad, data)
    with pytest.raises(ValueError, match="does not exist"):
        extras.batch_folder_images("missing", data)


def test_a_batch_folder_upscales_each_file_as_a_single_image_and_keeps_its_parameters(tmp_path, tool):
    """The batch path (folder -> files -> decoded images -> process_one): each saved result has the
    pixels of the single-image model upscale of its input, and the input's `parameters` (or none)."""
    data = tmp_path / "data"
    (data / "inputs").mkdir(parents=True)
    with_parameters = source_image(data / "inputs" / "a.png")
    plain = Image.fromarray(255 - np.asarray(with_parameters), "RGB")  # other pixels, no text chunk
    plain.save(data / "inputs" / "b.png")
    options = extras.ExtrasOptions(upscaler_1="2x-tiny", upscaling_resize=2)
    outputs = OutputStore(tmp_path / "outputs")
    paths = extras.batch_folder_images("inputs", data)
    results = [extras.process_one(tool, outputs, image, options) for image in extras.open_images(paths)]
    assert [p.name for p in paths] == ["a.png", "b.png"] and len(results) == 2
    expected_parameters = ["a cat\nSteps: 4, Sampler: Euler, Seed: 5, Size: 40x30", None]
    for source, parameters, (result, text, path) in zip((with_parameters, plain), expected_parameters, results):
        single = tool.upscale(source, 80, 60, "2x-tiny")
        assert result.tobytes() == single.tobytes()
        with Image.open(path) as saved:
            saved.load()
            assert saved.size == (80, 60) and saved.convert("RGB").tobytes() == single.tobytes()
            assert saved.info.get("parameters") == parameters
            assert saved.info["postprocessing"] == text
            assert text == "Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny"
    assert results[0][0].tobytes() != results[1][0].tobytes()  # two inputs, two different results
    assert results[0][0].tobytes() != with_parameters.resize((80, 60), Image.LANCZOS).tobytes()  # the model ran


def test_saving_twice_in_a_day_numbers_the_files(tmp_path):
    """A1111 names extras `NNNNN.png`; the second save of a day must not collide with the first."""
    from PIL import Image

    from pipelines import extras
    from pipelines.outputs import OutputStore

    store = OutputStore(tmp_path / "outputs")
    paths = [extras.save(store, Image.new("RGB", (8, 8), c), None, "Postprocess upscaler: Nearest") for c in ("red", "blue")]
    assert [p.name for p in paths] == ["00000.png", "00001.png"]
    with Image.open(paths[1]) as second:
        assert second.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("entry", ["ui", "api"])
def test_an_extras_model_upscale_waits_for_the_running_generation(tmp_path, entry):
    """Extras handlers run outside the job queue; their model upscale takes the manager's device
    lock, which a generation holds, so the upscaler never runs between two sampling steps."""
    import threading
    import time
    from types import SimpleNamespace

    from api import extras as api_extras
    from pipelines.generate import generate
    from pipelines.jobs import JobQueue
    from pipelines.request import GenerationRequest
    from tests import factories
    from tests.integration.conftest import make_engine
    from ui import extras_tab

    factories.write_tiny_checkpoint(tmp_path / "models" / "Stable-diffusion" / "a.safetensors")
    write_tiny_esrgan(tmp_path / "models" / "ESRGAN" / "2x-tiny.pth", scale=2)
    (tmp_path / "embeddings").mkdir()
    manager, _ = make_engine(tmp_path, tmp_path / "data")
    with manager.pipeline("txt2img", "a") as active:
        unet = active.pipe.unet
    model = upscalers.Upscalers.for_manager(manager).model("2x-tiny")  # the cached instance the handlers get
    events, sampling = [], threading.Event()

    def slow_step(*_):
        sampling.set()
        time.sleep(0.05)  # room for an upscale to slip in between steps, were it not locked out

    unet.register_forward_pre_hook(slow_step)
    unet.register_forward_hook(lambda *_: events.append(("unet", time.monotonic())))
    model.register_forward_pre_hook(lambda *_: events.append(("upscale", time.monotonic())))

    jobs = JobQueue(lambda request, progress, cancel: generate(manager, None, request, progress, cancel)).start()
    try:
        job = jobs.submit(GenerationRequest(checkpoint="a", prompt="x", steps=4, width=64, height=64, seed=1,
                                            sampler="Euler", save_images=False), owner="u")
        assert sampling.wait(120), "the generation did not start"
        if entry == "ui":
            ctx = SimpleNamespace(manager=manager, registry=manager.registry, outputs=None)
            extras_tab.run_images(ctx, [source_image()], {"upscaler_1": "2x-tiny", "upscaling_resize": 2})
        else:
            ctx = SimpleNamespace(manager=manager, registry=manager.registry)
            api_extras.run(ctx, [source_image()], api_extras.ExtrasSingleRequest(upscaler_1="2x-tiny"))
        job.result(timeout=120)
    finally:
        jobs.stop()
    steps = [t for what, t in events if what == "unet"]
    upscales = [t for what, t in events if what == "upscale"]
    assert len(steps) == 4 and upscales
    assert min(upscales) > max(steps)  # the upscale ran after the generation's last step
