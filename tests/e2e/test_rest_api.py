"""The A1111-compatible REST API on the real server, driven by real clients: webuiapi (the
A1111 client library), plain `requests` replaying Open WebUI's calls, and gradio_client on a
second server whose UI and API share a login. Results are compared
with the engine run in this process on the same checkpoint, pixel for pixel, and infotexts are
parsed back to the request."""
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pipelines.generate import generate
from pipelines.metadata import parse_infotext, read_infotext
from pipelines.request import GenerationRequest
from tests.e2e.conftest import API_AUTH

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "a lighthouse at dusk, (calm sea:1.1)"
BASE = dict(prompt=PROMPT, negative_prompt="fog", sampler_name="Euler a", steps=3, cfg_scale=5,
            width=64, height=64, seed=1234)
# What the engine gets for BASE (the server's default checkpoint is the user's tiny one).
ENGINE_BASE = dict(prompt=PROMPT, negative_prompt="fog", sampler="Euler a", steps=3, cfg_scale=5, width=64,
                   height=64, seed=1234, checkpoint="tiny.safetensors", save_images=False)


@pytest.fixture(scope="module")
def webui(server):
    import webuiapi

    host, port = server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), username=API_AUTH[0], password=API_AUTH[1])
    api.util_wait_for_ready(check_interval=0.2)
    return api


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


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def api_url(server, path: str) -> str:
    return f"{server.url}/sdapi/v1/{path}"


@pytest.fixture(scope="module")
def first(webui):
    return webui.txt2img(**BASE)


def test_txt2img_matches_the_engine_pixel_for_pixel_and_its_infotext_parses_back(first, engine):
    expected = generate(engine, None, GenerationRequest(task="txt2img", **ENGINE_BASE))
    assert len(first.images) == 1 and first.image.size == (64, 64)
    assert np.array_equal(pixels(first.image), pixels(expected.images[0]))
    text = first.info["infotexts"][0]
    assert text == expected.infotexts[0] and read_infotext(first.image) == text
    parsed = parse_infotext(text)
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Sampler"]) == (PROMPT, "fog", "Euler a")
    assert (parsed["Steps"], parsed["Seed"], parsed["CFG scale"], parsed["Size-1"], parsed["Size-2"]) == (
        "3", "1234", "5", "64", "64")
    assert parsed["Model"] == "tiny" and first.info["sd_model_name"] == "tiny"
    assert first.info["all_seeds"] == [1234] and first.parameters["prompt"] == PROMPT


def test_img2img_with_mask_keeps_the_outside_and_matches_the_engine(webui, first, engine):
    init = first.image.convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = webui.img2img(images=[init], mask_image=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                           denoising_strength=0.9, **BASE)
    expected = generate(engine, None, GenerationRequest(
        task="inpaint", init_image=init, mask=mask, mask_blur=0, inpainting_fill="original", denoising_strength=0.9,
        **ENGINE_BASE))
    got = pixels(result.image)
    assert np.array_equal(got, pixels(expected.images[0]))
    inside = np.asarray(mask) > 0
    assert np.array_equal(got[~inside], pixels(init)[~inside])  # outside the mask: the init image
    assert not np.array_equal(got[inside], pixels(init)[inside])
    parsed = parse_infotext(result.info["infotexts"][0])
    assert (parsed["Denoising strength"], parsed["Mask blur"], parsed["Masked content"]) == ("0.9", "0", "original")


def test_png_info_reads_back_what_txt2img_wrote(webui, first):
    info = webui.png_info(first.image)
    assert info.info == first.info["infotexts"][0]
    assert (info.parameters["Prompt"], info.parameters["Seed"], info.parameters["Steps"]) == (PROMPT, "1234", "3")


def test_lists_match_what_the_server_has(webui, server):
    from pipelines import samplers

    assert [s["name"] for s in webui.get_samplers()] == samplers.sampler_names()
    assert [s["label"] for s in webui.get_schedulers()] == samplers.schedule_labels()
    models = {m["model_name"]: m for m in webui.get_sd_models()}
    # Other e2e files add models to this server (merges); the truncated file is skipped by the scan.
    assert {"tiny", "tinyworld"} <= set(models) and "truncated" not in models
    assert models["tiny"]["filename"] == str(server.data_dir / "models" / "Stable-diffusion" / "tiny.safetensors")
    loras = {lora["name"]: lora for lora in webui.get_loras()}
    assert loras["styleA_v3"]["alias"] == "styleA" and loras["styleA_v3"]["metadata"]["ss_network_dim"] == "4"


def test_set_and_get_model_by_title(webui, engine):
    titles = {m["model_name"]: m["title"] for m in webui.get_sd_models()}
    assert titles["tiny"].startswith("tiny.safetensors [")  # hashed since it was used
    try:
        webui.util_set_model(titles["tinyworld"])
        assert webui.util_get_current_model() == titles["tinyworld"]
        result = webui.txt2img(**BASE)
        assert result.info["sd_model_name"] == "tinyworld"
        assert "Model: tinyworld" in result.info["infotexts"][0]
        # Once used, a model is hashed and its title becomes A1111's `name [shorthash]`.
        sha = webui.get_options()["sd_checkpoint_hash"]
        titled = f"tinyworld.safetensors [{sha[:10]}]"
        assert webui.util_get_current_model() == titled
        assert titled in [m["title"] for m in webui.get_sd_models()]
        # override_settings picks a checkpoint for one request only, by any alias (here the hash).
        tiny_hash = titles["tiny"].split("[")[1].rstrip("]")
        once = webui.txt2img(override_settings={"sd_model_checkpoint": tiny_hash}, **BASE)
        assert once.info["sd_model_name"] == "tiny" and webui.util_get_current_model() == titled
    finally:
        webui.util_set_model(titles["tiny"])
    assert webui.util_get_current_model() == titles["tiny"]


def test_progress_polling_and_interrupt_mid_run(webui, server):
    auth = API_AUTH
    outcome = {}

    def run():
        outcome["result"] = webui.txt2img(**{**BASE, "steps": 150, "width": 256, "height": 256})

    worker = threading.Thread(target=run)
    worker.start()
    seen, preview, compared = [], None, 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = requests.get(api_url(server, "progress"), auth=auth, timeout=10).json()
        preview = progress["current_image"] or preview
        if progress["state"]["job"]:
            # webuiapi's poll, just after: the same running job, no earlier in it.
            client_view, state = webui.get_progress(), progress["state"]
            assert 0 < progress["progress"] <= client_view["progress"] < 1, (progress, client_view)
            for key in ("job", "job_timestamp", "job_count", "sampling_steps", "interrupted"):
                assert client_view["state"][key] == state[key], key
            assert state["sampling_step"] <= client_view["state"]["sampling_step"] <= state["sampling_steps"]
            assert client_view["textinfo"] == f"step {client_view['state']['sampling_step']}/{state['sampling_steps']}"
            compared += 1
        if progress["state"]["sampling_step"] >= 3 and preview:
            seen.append(progress)
            break
        time.sleep(0.05)
    assert seen, "the job never showed progress with a live preview"
    assert compared, "webuiapi's get_progress was never compared with a running job"
    live = seen[-1]
    with Image.open(io.BytesIO(base64.b64decode(preview, validate=True))) as image:
        assert image.format == "PNG" and min(image.size) > 0  # the latent preview of the running job
    assert 0 < live["progress"] < 1 and live["state"]["job_count"] >= 1 and live["state"]["sampling_steps"] == 150
    assert live["eta_relative"] > 0 and live["textinfo"].startswith("step ")
    assert webui.interrupt() == {}
    worker.join(timeout=120)
    result = outcome["result"]
    assert result.info["interrupted"] is True and len(result.images) == 1  # decoded from where it stopped
    idle = webui.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_open_webui_flow_posts_the_whole_options_dict_back(server):
    session = requests.Session()
    session.headers["authorization"] = "Basic " + base64.b64encode(":".join(API_AUTH).encode()).decode()
    options = session.get(api_url(server, "options"), timeout=10)
    assert options.status_code == 200
    options = options.json()
    assert "forge_preset" not in options
    models = session.get(api_url(server, "sd-models"), timeout=10).json()
    target = next(m for m in models if m["model_name"] == "tinyworld")
    original = options["sd_model_checkpoint"]
    try:
        answer = session.post(api_url(server, "options"), json={**options, "sd_model_checkpoint": target["title"]})
        assert answer.status_code == 200 and answer.json() is None
        assert session.get(api_url(server, "options"), timeout=10).json()["sd_model_checkpoint"] == target["title"]
        generated = session.post(api_url(server, "txt2img"), timeout=300, json={
            "prompt": PROMPT, "batch_size": 2, "width": 64, "height": 64, "steps": 2, "cfg_scale": 5})
        assert generated.status_code == 200
        data = generated.json()
        info = json.loads(data["info"])
        assert info["sd_model_name"] == "tinyworld" and len(data["images"]) == 2
        for b64, text in zip(data["images"], info["infotexts"]):
            image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            assert image.size == (64, 64) and read_infotext(image) == text
    finally:
        session.post(api_url(server, "options"), json={"sd_model_checkpoint": original})


def test_every_route_refuses_missing_empty_or_wrong_credentials(server):
    schema = requests.get(server.url + "/openapi.json", auth=API_AUTH, timeout=10).json()
    routes = [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops]
    assert ("POST", "/sdapi/v1/txt2img") in routes and len(routes) >= 29
    routes += [("GET", "/openapi.json"), ("GET", "/docs")]
    wrong = "Basic " + base64.b64encode(b"apiuser:nope").decode()
    for method, path in routes:
        for headers in ({}, {"Authorization": ""}, {"Authorization": wrong}):
            response = requests.request(method, server.url + path, headers=headers, json={}, timeout=10)
            assert response.status_code == 401, (method, path, headers, response.text)
    assert requests.get(server.url + "/", timeout=10).status_code == 200  # the UI has no login here


def test_bad_request_is_422_with_a_specific_message(server):
    response = requests.post(api_url(server, "txt2img"), auth=API_AUTH, json={**BASE, "width": 100}, timeout=30)
    assert response.status_code == 422
    assert response.json()["detail"] == "width must be a multiple of 8 between 64 and 4096, got 100"
    response = requests.post(api_url(server, "img2img"), auth=API_AUTH, timeout=30,
                             json={**BASE, "init_images": ["/etc/passwd"]})
    assert response.status_code == 422 and "file paths are not accepted" in response.json()["detail"]


@pytest.fixture(scope="module")
def controlnet_model(server, engine):
    """A tiny ControlNet made from the tiny checkpoint's UNet, dropped into the server's
    models/ControlNet while it runs (GET /controlnet/model_list rescans)."""
    from tests.control_factories import tiny_controlnet, write_controlnet

    with engine.pipeline("txt2img", "tiny.safetensors") as active:
        controlnet = tiny_controlnet(active.pipe.unet, seed=1)
    write_controlnet(server.data_dir / "models" / "ControlNet" / "control_tiny_canny.safetensors", controlnet,
                     layout="ldm")
    engine.registry.refresh()
    return "control_tiny_canny"


def square() -> Image.Image:
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    return image


def test_controlnet_through_webuiapi_matches_the_engine(webui, engine, first, controlnet_model):
    import webuiapi

    from pipelines.control import ControlUnit, preprocessors

    assert webui.has_controlnet  # /scripts lists "controlnet m2m"
    assert webui.controlnet_version() == 2
    assert controlnet_model in webui.controlnet_model_list()
    assert "canny" in webui.controlnet_module_list()
    unit = webuiapi.ControlNetUnit(image=square(), module="canny", model=controlnet_model, weight=1.0,
                                   processor_res=64, threshold_a=100, threshold_b=200)
    result = webui.txt2img(controlnet_units=[unit], **BASE)
    expected = generate(engine, None, GenerationRequest(task="txt2img", control_units=(ControlUnit(
        module="canny", model=controlnet_model, image=square(), resize_mode="Resize and Fill", processor_res=64,
        threshold_a=100, threshold_b=200),), **ENGINE_BASE))
    assert np.array_equal(pixels(result.image), pixels(expected.images[0]))
    assert not np.array_equal(pixels(result.image), pixels(first.image))  # the control changed the picture
    assert "ControlNet 0: " in result.info["infotexts"][0] and "Module: canny" in result.info["infotexts"][0]
    # detect, as webuiapi sends it (controlnet_images), equals the preprocessor run here.
    detected = webui.controlnet_detect(images=[square()], module="canny", processor_res=64, threshold_a=100,
                                       threshold_b=200)
    want = preprocessors.detect("canny", square(), resolution=64, threshold_a=100, threshold_b=200)
    assert np.array_equal(pixels(detected.image), pixels(want))


def stroke() -> Image.Image:
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (8, 30, 56, 34))  # a drawn line: the extension uses it as the map
    return mask


def test_img2img_with_a_controlnet_unit_matches_the_engine(webui, engine, first, controlnet_model):
    import webuiapi

    from pipelines.control import ControlUnit

    init = first.image.convert("RGB")
    img2img = dict(init_image=init, denoising_strength=0.8, **ENGINE_BASE)
    unit_fields = dict(model=controlnet_model, resize_mode="Resize and Fill", processor_res=64, threshold_a=100,
                       threshold_b=200)
    plain = webui.img2img(images=[init], denoising_strength=0.8, **BASE)
    result = webui.img2img(images=[init], denoising_strength=0.8, **BASE, controlnet_units=[
        webuiapi.ControlNetUnit(image=square(), module="canny", **unit_fields)])
    expected = generate(engine, None, GenerationRequest(task="img2img", control_units=(
        ControlUnit(module="canny", image=square(), **unit_fields),), **img2img))
    assert np.array_equal(pixels(result.image), pixels(expected.images[0]))
    assert not np.array_equal(pixels(result.image), pixels(plain.image))  # the unit changed the picture
    assert "ControlNet 0: " in result.info["infotexts"][0]
    # A drawn unit mask is the control map, with preprocessor "none" (the extension's rule).
    masked = webui.img2img(images=[init], denoising_strength=0.8, **BASE, controlnet_units=[
        webuiapi.ControlNetUnit(image=square(), mask=stroke(), module="canny", **unit_fields)])
    want = generate(engine, None, GenerationRequest(task="img2img", control_units=(
        ControlUnit(module="none", image=stroke(), **unit_fields),), **img2img))
    assert np.array_equal(pixels(masked.image), pixels(want.images[0]))
    assert "Module: none" in masked.info["infotexts"][0]


# --- one user, two doors: the REST API and the UI share the queue and the progress --------------------

LOGIN = ("carol", "carol-pw")


@pytest.fixture(scope="module")
def login_server(server, tmp_path_factory):
    """A second server whose UI and REST API share one login (--auth and no --api-auth), reading
    the first server's models folder."""
    import os
    import subprocess
    import sys

    from tests.e2e.conftest import REPO_ROOT, Server, free_port, stop_server, wait_until_serving

    data_dir = tmp_path_factory.mktemp("login-data")
    port = free_port()
    log = data_dir / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("EASEL_DATA_DIR", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys, app; sys.exit(app.main(sys.argv[1:]))", "--data-dir", str(data_dir),
             "--models-dir", str(server.data_dir / "models"), "--port", str(port), "--device", "cpu", "--api",
             "--auth", ":".join(LOGIN)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Server(url=f"http://127.0.0.1:{port}", data_dir=data_dir, log=log, process=process)
    try:
        wait_until_serving(running, "/openapi.json", ready=(401,))  # the REST API mounts just after launch
        yield running
    finally:
        stop_server(process)


def wait_for(check, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout} s")


def test_a_users_rest_job_is_in_their_ui_queue_and_their_ui_job_in_rest_progress(login_server):
    from gradio_client import Client

    ui = Client(login_server.url, auth=LOGIN, verbose=False)
    long = {"prompt": "a long job", "steps": 150, "width": 256, "height": 256, "seed": 3, "sampler_name": "Euler"}
    outcome = {}
    rest = threading.Thread(target=lambda: outcome.update(response=requests.post(
        f"{login_server.url}/sdapi/v1/txt2img", auth=LOGIN, json=long, timeout=300)))
    rest.start()
    view = wait_for(lambda: [j for j in ui.predict(api_name="/queue")["jobs"] if j["state"] == "running"],
                    "the REST job never showed in the UI's queue")
    assert ui.predict(api_name="/queue")["you"] == "user:carol"
    assert [(j["mine"], j["task"]) for j in view] == [(True, "txt2img")]
    assert ui.predict(scope="mine", api_name="/cancel") == {"cancelled": 1}  # the UI's Cancel stops it
    rest.join(120)
    assert json.loads(outcome["response"].json()["info"])["interrupted"] is True

    job = ui.submit(prompt="a long ui job", steps=150, width=256, height=256, seed=4, checkpoint="tiny.safetensors",
                    api_name="/txt2img")
    progress = wait_for(lambda: (lambda p: p if p["state"]["sampling_step"] >= 2 else None)(
        requests.get(f"{login_server.url}/sdapi/v1/progress", auth=LOGIN, timeout=30).json()),
        "the UI job never showed in REST /progress")
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    assert progress["state"]["job"].startswith("txt2img") and progress["state"]["job_count"] >= 1
    assert requests.post(f"{login_server.url}/sdapi/v1/interrupt", auth=LOGIN, timeout=30).json() == {}
    _gallery, info = job.result(timeout=300)
    assert info["interrupted"] is True and len(info["seeds"]) == 1
