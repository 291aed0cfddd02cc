"""gradio_client for the documented endpoints the other e2e files do not drive: /queue and
/cancel (a running job of this client's session is listed, then cancelled), /extras_batch_images,
/extras_batch_directory, /merge_loras, /img2img in inpaint mode (against the engine in this
process), the X/Y/Z plot (txt2img and img2img), Prompts from file and ControlNet Preview endpoints (against plain
/txt2img runs and the preprocessor); each result is compared, not just received."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from gradio_client import handle_file
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.metadata import read_infotext
from tests.e2e.conftest import API_AUTH

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = dict(prompt="a lighthouse", negative_prompt="", sampler="Euler a", schedule="Automatic", steps=2,
            cfg_scale=5, width=64, height=64, seed=5, batch_count=1, batch_size=1,
            checkpoint="tiny.safetensors", vae="Automatic")
LORA_MODULE = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def gallery_paths(gallery) -> list[str]:
    return [item["image"] if isinstance(item, dict) else item for item in gallery]


def test_queue_lists_this_sessions_running_job_and_cancel_stops_it(client):
    outcome = {}
    job = client.submit(**{**BASE, "steps": 150, "width": 256, "height": 256}, api_name="/txt2img")
    deadline = time.monotonic() + 120
    view = None
    while time.monotonic() < deadline:
        view = client.predict(api_name="/queue")
        if view["jobs"]:
            break
        time.sleep(0.1)
    assert view["admin"] is False and view["you"].startswith("session:")
    assert [(j["mine"], j["state"], j["task"]) for j in view["jobs"]] == [(True, "running", "txt2img")]
    assert client.predict(scope="mine", api_name="/cancel") == {"cancelled": 1}
    _gallery, info = job.result(timeout=120)
    assert info["interrupted"] is True
    assert client.predict(api_name="/queue")["jobs"] == []
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="only admins"):
        client.predict(scope="all", api_name="/cancel")


def test_extras_batch_images_and_directory(client, server):
    sources = []
    for colour in ("red", "blue"):
        _gallery, info = client.predict(**{**BASE, "prompt": colour}, api_name="/txt2img")
        sources.append(info["paths"][0])
    gallery, text = client.predict(files=[handle_file(p) for p in sources], resize_mode="by", upscaling_resize=2,
                                   upscaler_1="Nearest", api_name="/extras_batch_images")
    outputs = gallery_paths(gallery)
    assert len(outputs) == 2 and "Postprocess upscaler: Nearest" in text
    for source, output in zip(sources, outputs):
        with Image.open(source) as small, Image.open(output) as big:
            # Nearest x2 repeats every pixel twice in both directions.
            expected = np.asarray(small.convert("RGB")).repeat(2, axis=0).repeat(2, axis=1)
            assert np.array_equal(np.asarray(big.convert("RGB")), expected)
    folder = server.data_dir / "batch-in"
    folder.mkdir(exist_ok=True)
    for index, source in enumerate(sources):
        (folder / f"{index}.png").write_bytes(Path(source).read_bytes())
    gallery, _text = client.predict(input_dir="batch-in", resize_mode="by", upscaling_resize=2, upscaler_1="Nearest",
                                    api_name="/extras_batch_directory")
    assert len(gallery_paths(gallery)) == 2
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="inside the data folder"):
        client.predict(input_dir="/etc", upscaler_1="Nearest", api_name="/extras_batch_directory")


def test_merge_loras_adds_the_weighted_deltas(client, server):
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 8, generator=generator), torch.randn(16, 2, generator=generator)
    save_file({f"{LORA_MODULE}.lora_down.weight": down, f"{LORA_MODULE}.lora_up.weight": up,
               f"{LORA_MODULE}.alpha": torch.tensor(2.0)}, str(server.data_dir / "models" / "Lora" / "tinylora.safetensors"))
    # The new file shows up after a refresh, here through the REST API.
    assert requests.post(f"{server.url}/sdapi/v1/refresh-loras", auth=API_AUTH, timeout=30).status_code == 200
    message = client.predict(loras="tinylora:1, tinylora:0.5", mode="concat", precision="fp32",
                             output_name="tinylora-merged", api_name="/merge_loras")
    assert message == "Saved tinylora-merged.safetensors"
    merged = load_file(str(server.data_dir / "models" / "Lora" / "tinylora-merged.safetensors"))
    m_down, m_up = merged[f"{LORA_MODULE}.lora_down.weight"], merged[f"{LORA_MODULE}.lora_up.weight"]
    scale = float(merged[f"{LORA_MODULE}.alpha"]) / m_down.shape[0]
    assert torch.allclose(m_up @ m_down * scale, 1.5 * (up @ down), atol=1e-5)


# --- inpaint and the script / preview endpoints, compared with the engine and plain generations -----

@pytest.fixture(scope="module")
def engine(server, tmp_path_factory):
    """The engine in this process, over the server's models folder (read only)."""
    from pipelines.cache import ModelCache
    from pipelines.hashing import HashCache
    from pipelines.manager import PipelineManager
    from pipelines.registry import ModelPaths, ModelRegistry

    own = tmp_path_factory.mktemp("engine")
    paths = ModelPaths(models_dir=server.data_dir / "models", embeddings_dir=own / "embeddings",
                       builtin_dir=own / "no-builtin")
    registry = ModelRegistry(paths, HashCache(own / "cache.json"))
    registry.refresh()
    return PipelineManager(registry, ModelCache(1 << 30), torch.device("cpu"), torch.float32)


ENGINE_BASE = dict(prompt="a lighthouse", negative_prompt="", sampler="Euler a", schedule="Automatic", steps=2,
                   cfg_scale=5, width=64, height=64, seed=5, checkpoint="tiny.safetensors", save_images=False)


def rgb(path_or_image) -> np.ndarray:
    if isinstance(path_or_image, Image.Image):
        return np.asarray(path_or_image.convert("RGB"))
    with Image.open(path_or_image) as image:
        return np.asarray(image.convert("RGB"))


def test_img2img_inpaint_with_an_uploaded_mask_matches_the_engine(client, engine, tmp_path):
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    _gallery, info = client.predict(**BASE, api_name="/txt2img")
    init_path = info["paths"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    gallery, inpainted = client.predict(**{**BASE, "denoising_strength": 0.9}, mode="inpaint",
                                        init_image=handle_file(init_path), mask=handle_file(str(tmp_path / "mask.png")),
                                        mask_blur=0, inpainting_fill="original", inpaint_area="Whole picture",
                                        api_name="/img2img")
    with Image.open(init_path) as image:
        init = image.convert("RGB")
    expected = generate(engine, None, GenerationRequest(
        task="inpaint", init_image=init, mask=mask, mask_blur=0, inpainting_fill="original", denoising_strength=0.9,
        inpaint_full_res=False, **ENGINE_BASE))
    got = rgb(gallery_paths(gallery)[0])
    assert np.array_equal(got, rgb(expected.images[0]))
    inside = np.asarray(mask) > 0
    assert np.array_equal(got[~inside], rgb(init)[~inside]) and not np.array_equal(got[inside], rgb(init)[inside])
    assert "Mask blur: 0" in inpainted["infotexts"][0] and "Inpaint area: Whole picture" in inpainted["infotexts"][0]


def test_xyz_plot_grid_cells_are_the_plain_txt2img_images(client):
    gallery, infotext = client.predict(**BASE, xyz_x_type="Steps", xyz_x_values="1, 2", xyz_save=True,
                                       api_name="/txt2img_xyz_plot")
    (grid_path,) = gallery_paths(gallery)
    grid = rgb(grid_path)
    assert grid.shape[1] == 2 * 64 and "X Type: Steps" in infotext and "X Values: \"1, 2\"" in infotext
    for index, steps in enumerate((1, 2)):
        _cells, info = client.predict(**{**BASE, "steps": steps}, api_name="/txt2img")
        # Only an X axis: the cells are the grid's bottom row, one image wide each, unscaled.
        assert np.array_equal(grid[-64:, index * 64:(index + 1) * 64], rgb(info["paths"][0])), steps
    with Image.open(grid_path) as saved:
        assert read_infotext(saved) == infotext


def test_img2img_xyz_plot_grid_cells_are_the_plain_img2img_images(client):
    _gallery, info = client.predict(**BASE, api_name="/txt2img")
    init_path = info["paths"][0]
    form = dict(**BASE, mode="img2img", init_image=handle_file(init_path))
    gallery, infotext = client.predict(**form, xyz_x_type="Denoising", xyz_x_values="0.5, 1.0", xyz_save=True,
                                       api_name="/img2img_xyz_plot")
    (grid_path,) = gallery_paths(gallery)
    grid = rgb(grid_path)
    assert grid.shape[1] == 2 * 64 and "X Type: Denoising" in infotext and "X Values: \"0.5, 1.0\"" in infotext
    cells = [grid[-64:, index * 64:(index + 1) * 64] for index in range(2)]
    for cell, strength in zip(cells, (0.5, 1.0)):
        _plain, plain_info = client.predict(**form, denoising_strength=strength, api_name="/img2img")
        assert np.array_equal(cell, rgb(plain_info["paths"][0])), strength
    # The axis changed the picture: each cell is its own denoise of the init image.
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[0], rgb(init_path))
    with Image.open(grid_path) as saved:
        assert read_infotext(saved) == infotext


def test_prompts_from_file_runs_one_generation_per_line(client):
    gallery, summary = client.predict(**BASE, pff_text="a red barn\n--prompt \"a blue barn\" --steps 1",
                                      pff_iterate_seed=False, api_name="/prompts_from_file")
    paths = gallery_paths(gallery)
    assert summary == "2 of 2 line(s) done, 2 image(s)." and len(paths) == 2
    for path, changes in zip(paths, ({"prompt": "a red barn"}, {"prompt": "a blue barn", "steps": 1})):
        _gallery, info = client.predict(**{**BASE, **changes}, api_name="/txt2img")
        assert np.array_equal(rgb(path), rgb(info["paths"][0])), changes
        with Image.open(path) as image:
            assert read_infotext(image).startswith(changes["prompt"] + "\n")


def test_controlnet_preview_is_the_preprocessor_map(client, tmp_path):
    from pipelines.control import preprocessors

    source = Image.new("RGB", (96, 64))
    source.paste((255, 255, 255), (24, 16, 72, 48))
    source.save(tmp_path / "source.png")
    detected = client.predict(image=handle_file(str(tmp_path / "source.png")), module="canny", resolution=64,
                              threshold_a=100, threshold_b=200, api_name="/controlnet_preview")
    expected = preprocessors.detect("canny", source, resolution=64, threshold_a=100, threshold_b=200)
    assert np.array_equal(rgb(detected), rgb(expected)) and len(np.unique(rgb(expected))) == 2
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="upload a control image first"):
        client.predict(module="canny", api_name="/controlnet_preview")
