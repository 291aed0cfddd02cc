"""gradio_client for the documented endpoints the other e2e files do not drive: /queue and
/cancel (a running job of this client's session is listed, then cancelled), /extras_batch_images,
/extras_batch_directory and /merge_loras; each result is compared, not just received."""
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
