"""The REST API in process (FastAPI TestClient): payload mapping, response shapes, errors,
options, auth and progress, over a real registry of header-only model files and a fake job
queue that records what it was asked to run. The real server is tested in tests/e2e."""
import base64
import io
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import api
from api.auth import check
from pipelines.access import Authenticator, User, hash_password
from pipelines.hashing import HashCache
from pipelines.jobs import CancelToken, Progress
from pipelines.metadata import format_infotext, read_infotext
from pipelines.registry import ModelPaths, ModelRegistry
from pipelines.request import GenerationResult
from pipelines.settings import Settings
from tests import stripped

AUTH = ("alice", "s3cret")


class FakeJob:
    def __init__(self, job_id, owner, request, result):
        self.id, self.owner, self.request = job_id, owner, request
        self.token = CancelToken()
        self.latest = None
        self._result = result
        self.finished = True

    def result(self, timeout=None):
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def cancel(self):
        self.token.cancel()


class FakeJobs:
    """Records submitted requests; 'runs' them by drawing a flat image per seed."""

    def __init__(self):
        self.submitted, self.cancelled, self.skipped, self.running = [], [], [], None
        self.fail_with = None

    def submit(self, request, owner=""):
        seeds = [max(request.seed, 0) + i for i in range(request.total_images)]
        texts = [format_infotext(request.prompt, request.negative_prompt,
                                 {"Steps": request.steps, "Sampler": request.sampler, "CFG scale": request.cfg_scale,
                                  "Seed": s, "Size": f"{request.width}x{request.height}", "Model hash": "0123456789",
                                  "Model": "sd15", "RNG": "CPU", "Version": "easel-test"}) for s in seeds]
        images = [Image.new("RGB", (request.width, request.height), (s % 256, 10, 20)) for s in seeds]
        result = self.fail_with or GenerationResult(images=images, infotexts=texts, seeds=seeds, paths=[])
        self.submitted.append((owner, request))
        return FakeJob(len(self.submitted), owner, request, result)

    def cancel(self, owner):
        self.cancelled.append(owner)
        return 1

    def skip(self, owner):
        self.skipped.append(owner)
        return 1

    def current(self):
        return self.running

    def queued_count(self):
        return 1 if self.running else 0


class FakeManager:
    def __init__(self, registry=None):
        import torch
        from pipelines.cache import ModelCache
        self.loads, self.unloads = [], 0
        self.cache, self.device, self.dtype = ModelCache(1 << 20), torch.device("cpu"), torch.float32
        self.registry = registry  # as the real manager has

    def device_lock(self):
        from contextlib import nullcontext
        return nullcontext()

    def pipeline(self, task, checkpoint, vae="Automatic"):
        from contextlib import nullcontext
        self.loads.append((checkpoint, vae))
        return nullcontext()

    def unload(self):
        self.unloads += 1


@pytest.fixture()
def ctx(tmp_path):
    models = tmp_path / "data" / "models"
    stripped.write_stripped(models / "Stable-diffusion" / "sd15.safetensors", stripped.sd1_layout())
    stripped.write_stripped(models / "Stable-diffusion" / "sub" / "other.safetensors", stripped.sd1_layout())
    stripped.write_stripped(models / "VAE" / "vae-ft-mse.safetensors", stripped.vae_layout())
    stripped.write_stripped(models / "Lora" / "styleA_v3.safetensors", stripped.kohya_lora_sd1_layout(),
                            {"ss_output_name": "styleA"})
    stripped.write_stripped(models / "ControlNet" / "control_v11p_sd15_canny.safetensors",
                            {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                             "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)})
    settings = Settings(data_dir=tmp_path / "data", api=True)
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "styles.csv").write_text('name,prompt,negative_prompt\nnoir,"{prompt}, black and white",colour\n')
    paths = ModelPaths(models_dir=models, embeddings_dir=tmp_path / "data" / "embeddings",
                       builtin_dir=tmp_path / "no-builtin")
    registry = ModelRegistry(paths, HashCache(tmp_path / "data" / "cache.json"))
    registry.refresh()
    from pipelines.prompts.source import PromptSource
    return SimpleNamespace(settings=settings, registry=registry, manager=FakeManager(registry), jobs=FakeJobs(),
                           prompts=PromptSource.for_data_dir(settings.data_dir))


def make_client(ctx, credentials=()):
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # as Gradio's app is configured
    verify = Authenticator([User(name, secret) for name, secret in credentials]) if credentials else None
    api.mount(app, ctx, verify)
    return TestClient(app)


@pytest.fixture()
def client(ctx):
    return make_client(ctx)


def b64_png(image: Image.Image, data_url: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text, validate=True)))


# --- txt2img mapping and response --------------------------------------------------------------

def test_txt2img_maps_a1111_fields_and_ignores_unknown_keys(client, ctx):
    body = {"prompt": "a cat", "negative_prompt": "dog", "steps": 3, "width": 64, "height": 128, "seed": 7,
            "n_iter": 2, "batch_size": 1, "sampler_name": "DPM++ 2M Karras", "cfg_scale": 4.5,
            "url": "http://sillytavern/", "auth": "x", "restore_faces": False}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    owner, request = ctx.jobs.submitted[0]
    assert owner == "api:anonymous"  # no login: API callers share one owner
    assert (request.task, request.prompt, request.negative_prompt, request.steps) == ("txt2img", "a cat", "dog", 3)
    assert (request.width, request.height, request.seed, request.batch_count) == (64, 128, 7, 2)
    assert (request.sampler, request.schedule, request.cfg_scale) == ("DPM++ 2M", "Karras", 4.5)
    assert request.checkpoint == "sd15.safetensors" and request.vae == "Automatic"
    assert request.save_images is False  # A1111's API default


def test_txt2img_defaults_are_a1111s(client, ctx):
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64}).status_code == 200
    _owner, request = ctx.jobs.submitted[0]
    assert (request.steps, request.cfg_scale, request.sampler, request.seed) == (50, 7.0, "Euler", -1)


def test_response_is_raw_base64_png_with_infotext_info_json_and_parameters(client):
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 7, "batch_size": 2, "foo": 1}
    data = client.post("/sdapi/v1/txt2img", json=body).json()
    assert len(data["images"]) == 2 and not data["images"][0].startswith("data:")
    info = json.loads(data["info"])
    for index, text in enumerate(data["images"]):
        image = decode(text)
        assert image.format == "PNG" and image.size == (64, 64)
        assert read_infotext(image) == info["infotexts"][index]
        assert image.getpixel((0, 0)) == (7 + index, 10, 20)
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and info["sd_model_name"] == "sd15"
    assert info["sd_model_hash"] == "0123456789" and info["extra_generation_params"] == {"RNG": "CPU"}
    assert info["prompt"] == "a cat" and info["sampler_name"] == "Euler" and info["index_of_first_image"] == 0
    params = data["parameters"]
    assert params["prompt"] == "a cat" and params["steps"] == 3 and params["enable_hr"] is False
    assert "foo" not in params and params["sampler_index"] == "Euler"


def test_send_images_false_returns_no_images(client):
    data = client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "send_images": False}).json()
    assert data["images"] == [] and json.loads(data["info"])["all_seeds"]


def test_override_settings_apply_to_one_request_unless_kept(client, ctx):
    body = {"width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "other", "sd_vae": "vae-ft-mse",
                                                               "CLIP_stop_at_last_layers": 2}}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    request = ctx.jobs.submitted[-1][1]
    assert (request.checkpoint, request.vae) == ("sub/other.safetensors", "vae-ft-mse.safetensors")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd15.safetensors"
    body["override_settings_restore_afterwards"] = False
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_model_checkpoint"], options["sd_vae"], options["CLIP_stop_at_last_layers"]) == (
        "sub/other.safetensors", "vae-ft-mse.safetensors", 2)


# --- img2img -----------------------------------------------------------------------------------

def test_img2img_with_mask_maps_inpaint_fields(client, ctx):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"init_images": [b64_png(init, data_url=True)], "mask": b64_png(mask, data_url=True), "width": 64,
            "height": 64, "denoising_strength": 0.4, "resize_mode": 1, "inpainting_fill": 1, "mask_blur": 2,
            "inpaint_full_res": False, "inpaint_full_res_padding": 8, "inpainting_mask_invert": 1}
    data = client.post("/sdapi/v1/img2img", json=body)
    assert data.status_code == 200, data.text
    request = ctx.jobs.submitted[0][1]
    assert (request.task, request.denoising_strength, request.resize_mode) == ("inpaint", 0.4, "crop and resize")
    assert (request.inpainting_fill, request.mask_blur, request.inpaint_full_res) == ("original", 2, False)
    assert (request.inpaint_full_res_padding, request.inpainting_mask_invert) == (8, True)
    assert request.init_image.tobytes() == init.tobytes()
    assert request.mask.convert("L").tobytes() == mask.tobytes()
    params = data.json()["parameters"]
    assert params["init_images"] is None and params["mask"] is None  # include_init_images is false


def test_img2img_without_mask_is_img2img_and_echoes_images_when_asked(client, ctx):
    init = b64_png(Image.new("RGB", (64, 64), "blue"))
    data = client.post("/sdapi/v1/img2img", json={"init_images": [init], "width": 64, "height": 64,
                                                   "include_init_images": True}).json()
    request = ctx.jobs.submitted[0][1]
    assert request.task == "img2img" and request.denoising_strength == 0.75 and request.mask is None
    assert data["parameters"]["init_images"] == [init]


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, message", [
    ("txt2img", {"width": 100}, "width must be a multiple of 8 between 64 and 4096, got 100"),
    ("txt2img", {"steps": "many"}, "steps: Input should be a valid integer"),
    ("txt2img", {"sampler_name": "Nope"}, "Nope"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing"}}, "Checkpoint 'missing' not found"),
    ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "script 'ADetailer' is not available"),
    ("img2img", {}, "init_images must hold at least one base64 image"),
    ("img2img", {"init_images": ["http://127.0.0.1/x.png"]}, "image URLs are not accepted"),
    ("img2img", {"init_images": ["/etc/passwd"]}, "file paths are not accepted"),
    ("img2img", {"init_images": ["bm90IGFuIGltYWdl"]}, "init_images[0]: the upload is not a readable image"),
    ("img2img", {"init_images": ["IMAGE"], "resize_mode": 3}, "resize_mode must be 0"),
    ("img2img", {"init_images": ["IMAGE"], "mask": "IMAGE", "inpainting_fill": 2}, "inpainting_fill must be 0"),
    ("png-info", {"image": "file:///etc/passwd"}, "image URLs are not accepted"),
    # A1111 fields Easel cannot honour: refused rather than silently ignored.
    ("txt2img", {"restore_faces": True}, "restore_faces is not supported yet (Easel has no face restoration); "
                                         "send restore_faces: false"),
    ("img2img", {"init_images": ["IMAGE"], "subseed_strength": 0.3}, "variation seeds work in txt2img only for now"),
    ("txt2img", {"subseed_strength": 1.5}, "variation strength must be between 0 and 1, got 1.5"),
    ("txt2img", {"enable_hr": True, "hr_scheduler": "Karras"}, "hr_scheduler 'Karras' is not supported: the hires "
                                                               "pass uses the first pass's scheduler ('Automatic')"),
    ("txt2img", {"scheduler": "karras", "hr_scheduler": "Automatic"}, "hr_scheduler 'Automatic' is not supported"),
    ("img2img", {"init_images": ["IMAGE"], "mask": "IMAGE", "mask_blur_x": 4, "mask_blur_y": 8},
     "mask_blur_x (4) and mask_blur_y (8) differ"),
])
def test_bad_input_is_422_with_a_specific_message(client, ctx, path, body, message):
    image = b64_png(Image.new("RGB", (64, 64)))
    body = json.loads(json.dumps(body).replace('"IMAGE"', json.dumps(image)))
    response = client.post(f"/sdapi/v1/{path}", json={"width": 64, "height": 64, **body})
    assert response.status_code == 422
    assert message in response.json()["detail"] and "\n" not in response.json()["detail"]
    assert ctx.jobs.submitted == []


def test_tiling_reaches_the_request(client, ctx):
    init = b64_png(Image.new("RGB", (64, 64), "blue"))
    for path, body in (("txt2img", {}), ("img2img", {"init_images": [init]})):
        response = client.post(f"/sdapi/v1/{path}", json={"width": 64, "height": 64, "tiling": True, **body})
        assert response.status_code == 200, response.text
        assert ctx.jobs.submitted[-1][1].tiling is True
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64})
    assert ctx.jobs.submitted[-1][1].tiling is False
    # a pasted infotext's Tiling applies too (A1111 apply_infotext)
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64,
                                           "infotext": "a\nSteps: 2, Seed: 1, Size: 64x64, Tiling: True"})
    assert ctx.jobs.submitted[-1][1].tiling is True


def test_variation_seeds_reach_the_request(client, ctx):
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "subseed": 42, "subseed_strength": 0.3})
    request = ctx.jobs.submitted[-1][1]
    assert (request.subseed, request.subseed_strength) == (42, 0.3)
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64})
    assert (ctx.jobs.submitted[-1][1].subseed, ctx.jobs.submitted[-1][1].subseed_strength) == (-1, 0)
    # a pasted infotext's variation seed applies too; the request's own field wins (A1111 apply_infotext)
    infotext = "a\nSteps: 2, Seed: 1, Size: 64x64, Variation seed: 7, Variation seed strength: 0.25"
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "infotext": infotext})
    assert (ctx.jobs.submitted[-1][1].subseed, ctx.jobs.submitted[-1][1].subseed_strength) == (7, 0.25)
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "infotext": infotext, "subseed": 9})
    assert ctx.jobs.submitted[-1][1].subseed == 9


def test_webuiapi_defaults_and_equivalent_values_of_the_refused_fields_pass(client, ctx, monkeypatch):
    import webuiapi

    # webuiapi's own payloads (every field at its default), sent through the in-process app.
    monkeypatch.setattr(webuiapi.WebUIApi, "check_extensions", lambda self: None)  # no network in __init__
    webui = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1")
    monkeypatch.undo()
    webui.session = client
    webui.check_extensions()
    assert webui.has_controlnet  # so it sends its empty ControlNet entry too
    assert len(webui.txt2img(prompt="a", width=64, height=64, steps=2).images) == 1
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    webui.img2img(images=[Image.new("RGB", (64, 64), "blue")], mask_image=mask, width=64, height=64, steps=2)
    txt, inpaint = [request for _owner, request in ctx.jobs.submitted]
    assert (txt.task, txt.steps, inpaint.task, inpaint.mask_blur) == ("txt2img", 2, "inpaint", 4)
    # Values that mean what Easel does anyway are accepted.
    for body in ({"hr_scheduler": "Use same scheduler", "restore_faces": False, "tiling": False},
                 {"hr_scheduler": "Automatic", "subseed_strength": 0},
                 {"scheduler": "karras", "hr_scheduler": "Karras", "enable_hr": True}):
        response = client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, **body})
        assert response.status_code == 200, (body, response.text)
    init = b64_png(Image.new("RGB", (64, 64), "blue"))
    for body, blur in (({"mask_blur_x": 6, "mask_blur_y": 6}, 6), ({"mask_blur": 3, "mask_blur_x": 6, "mask_blur_y": 1}, 3)):
        response = client.post("/sdapi/v1/img2img", json={"init_images": [init], "mask": b64_png(mask), "width": 64,
                                                          "height": 64, **body})
        assert response.status_code == 200 and ctx.jobs.submitted[-1][1].mask_blur == blur, (body, response.text)


def test_engine_failure_is_a_json_error(client, ctx):
    ctx.jobs.fail_with = ValueError("the mask is empty: paint the area to change")
    response = client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64})
    assert response.status_code == 422 and response.json()["detail"].startswith("the mask is empty")
    ctx.jobs.fail_with = RuntimeError("out of memory")
    response = client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64})
    assert response.status_code == 500 and response.json()["detail"] == "RuntimeError: out of memory"


# --- options -----------------------------------------------------------------------------------

def test_posting_the_whole_options_dict_back_changes_nothing(client, ctx):
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "sd15.safetensors" and "forge_preset" not in options
    response = client.post("/sdapi/v1/options", json=options)
    assert response.status_code == 200 and response.json() is None
    assert ctx.manager.loads == [] and client.get("/sdapi/v1/options").json() == options


def test_setting_the_checkpoint_loads_it_accepts_aliases_and_persists(client, ctx):
    options = client.get("/sdapi/v1/options").json()
    options |= {"sd_model_checkpoint": "sub_other", "api_enable_requests": True, "no_such_option": 1}
    assert client.post("/sdapi/v1/options", json=options).status_code == 200
    assert ctx.manager.loads == [("sub/other.safetensors", "Automatic")]
    after = client.get("/sdapi/v1/options").json()
    assert after["sd_model_checkpoint"] == "sub/other.safetensors"
    assert after["api_enable_requests"] is False and "no_such_option" not in after  # restricted / unknown: ignored
    stored = json.loads(ctx.settings.config_file.read_text())
    assert stored["sd_model_checkpoint"] == "sub/other.safetensors"
    # A new server reads it back.
    assert make_client(ctx).get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sub/other.safetensors"
    # The title with a hash resolves once the hash is known.
    sha = ctx.registry.sha256(ctx.registry.find("checkpoint", "sd15"))
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"sd15.safetensors [{sha[:10]}]"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == f"sd15.safetensors [{sha[:10]}]"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": sha}).status_code == 200


def test_unknown_checkpoint_or_bad_clip_skip_is_422_and_changes_nothing(client, ctx):
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert response.status_code == 422 and "Checkpoint 'nope' not found" in response.json()["detail"]
    response = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 40})
    assert response.status_code == 422 and "from 1 to 12" in response.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd15.safetensors"
    assert ctx.manager.loads == []


# --- lists -------------------------------------------------------------------------------------

def test_lists_have_a1111_shapes(client, ctx):
    from pipelines import samplers

    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["sd15", "sub_other"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert [s["name"] for s in client.get("/sdapi/v1/samplers").json()] == samplers.sampler_names()
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == samplers.schedule_labels()
    assert client.get("/sdapi/v1/loras").json()[0] | {"metadata": None, "path": None} == {
        "name": "styleA_v3", "alias": "styleA", "path": None, "metadata": None}
    assert client.get("/sdapi/v1/sd-vae").json()[0]["model_name"] == "vae-ft-mse.safetensors"
    controlnet = ["controlnet", "controlnet m2m"]  # webuiapi looks for "controlnet m2m"
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": controlnet, "img2img": controlnet}
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    import torch
    from safetensors.torch import save_file
    embeddings = ctx.settings.data_dir / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.zeros(3, 768)}, str(embeddings / "easyneg.safetensors"))
    (embeddings / "broken.pt").write_bytes(b"not a pickle")
    ctx.registry.refresh()
    listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["easyneg"] | {"step": 0} == {"step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                         "shape": 768, "vectors": 3}
    assert list(listed["skipped"]) == ["broken"]
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["auth"] is None
    assert "ram" in client.get("/sdapi/v1/memory").json()


def test_png_info_reads_infotext_and_parses_it(client):
    text = "a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 9, Size: 64x32"
    from pipelines.metadata import image_bytes_with_infotext
    png = base64.b64encode(image_bytes_with_infotext(Image.new("RGB", (64, 32)), text, "png")).decode()
    app_client = client
    data = app_client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + png}).json()
    assert data["info"] == text
    assert (data["parameters"]["Prompt"], data["parameters"]["Seed"], data["parameters"]["Size-1"]) == ("a cat", "9", "64")
    plain = base64.b64encode(image_bytes_with_infotext(Image.new("RGB", (8, 8)), None, "png")).decode()
    assert app_client.post("/sdapi/v1/png-info", json={"image": plain}).json() == {"info": "", "items": {}, "parameters": {}}


# --- progress, interrupt -----------------------------------------------------------------------

def test_progress_idle_then_running_job(client, ctx):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    from pipelines.request import GenerationRequest
    job = FakeJob(3, "ui", GenerationRequest(steps=10, width=64, height=64), None)
    job.latest = Progress(step=4, total_steps=10, batch_index=0, batch_count=2, preview=Image.new("RGB", (8, 8), "red"))
    ctx.jobs.running = job
    busy = client.get("/sdapi/v1/progress").json()
    assert busy["progress"] == pytest.approx(0.2) and busy["state"]["job_count"] == 1
    assert (busy["state"]["sampling_step"], busy["state"]["sampling_steps"]) == (4, 10)
    assert decode(busy["current_image"]).getpixel((0, 0)) == (255, 0, 0)
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None


def test_interrupt_and_skip_cancel_the_callers_jobs_and_return_json(ctx):
    client = make_client(ctx, [AUTH, ("bob", "pw")])
    assert client.post("/sdapi/v1/interrupt", auth=AUTH).json() == {}
    assert client.post("/sdapi/v1/skip", auth=("bob", "pw")).json() == {}
    # A logged-in API user is the same owner as that user in the UI; skip is not interrupt.
    assert ctx.jobs.cancelled == ["user:alice"] and ctx.jobs.skipped == ["user:bob"]


# --- auth --------------------------------------------------------------------------------------

def test_every_route_needs_the_credentials(ctx):
    client = make_client(ctx, [AUTH])
    schema = client.get("/openapi.json", auth=AUTH).json()
    routes = [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops]
    assert len(routes) == 46  # 35 (/cancel-all, /history: api/admin.py) + 5 extension routes + 6 ControlNet; a missing route would answer 404, not 401
    routes += [("GET", "/openapi.json"), ("GET", "/docs")]
    for method, path in routes:
        for headers in ({}, {"Authorization": ""}, {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()},
                        {"Authorization": "Basic " + base64.b64encode(b"bob:s3cret").decode()}, {"Authorization": "Bearer x"}):
            response = client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Basic"
    assert client.get("/sdapi/v1/options", auth=AUTH).status_code == 200
    assert ctx.jobs.submitted == [] and ctx.jobs.cancelled == []


def test_without_credentials_an_empty_authorization_header_is_fine(client):
    assert client.get("/sdapi/v1/options", headers={"Authorization": ""}).status_code == 200


def test_basic_header_check_uses_the_login_verifier():
    verify = Authenticator([User("a", "b"), User("c", hash_password("d:e", iterations=1000))])
    assert check(verify, "Basic " + base64.b64encode(b"c:d:e").decode()) == "c"
    assert check(verify, "basic " + base64.b64encode(b"a:b").decode()) == "a"
    assert check(None, None) is None
    from fastapi import HTTPException
    for header in (None, "", "Basic", "Basic !!!", "Basic " + base64.b64encode(b"ab").decode()):
        with pytest.raises(HTTPException):
            check(verify, header)


def test_api_auth_falls_back_to_the_ui_login(tmp_path):
    import app

    ui_only = app.api_authenticator(Settings(data_dir=tmp_path, auth="ui:pw"))
    assert ui_only("ui", "pw") and not ui_only("x", "y")
    both = app.api_authenticator(Settings(data_dir=tmp_path, auth="ui:pw", api_auth="x:y,@boss:z"))
    assert both("x", "y") and both("boss", "z") and not both("ui", "pw")
    assert app.api_authenticator(Settings(data_dir=tmp_path)) is None


def test_openapi_schema_documents_the_a1111_fields(client):
    schema = client.get("/openapi.json").json()
    txt2img = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    for key in ("prompt", "sampler_name", "n_iter", "override_settings", "alwayson_scripts", "enable_hr"):
        assert key in txt2img
    img2img = schema["components"]["schemas"]["Img2ImgRequest"]["properties"]
    for key in ("init_images", "mask", "inpainting_fill", "resize_mode", "denoising_strength"):
        assert key in img2img
    # ControlNet units are described, under the key the extension reads, in both requests.
    unit = schema["components"]["schemas"]["ControlNetUnit"]["properties"]
    assert {"enabled", "module", "model", "weight", "image", "mask", "resize_mode", "processor_res", "threshold_a",
            "threshold_b", "guidance_start", "guidance_end", "control_mode", "pixel_perfect"} <= set(unit)
    assert unit["weight"]["default"] == 1.0 and unit["module"]["default"] == "none"
    for properties in (txt2img, img2img):
        controlnet = properties["alwayson_scripts"]["properties"]["ControlNet"]
        assert controlnet["properties"]["args"]["items"] == {"$ref": "#/components/schemas/ControlNetUnit"}
        assert properties["alwayson_scripts"]["additionalProperties"] is True  # still a plain dict
    assert client.get("/docs").status_code == 200 and "swagger" in client.get("/docs").text.lower()


def test_hires_fields_keep_their_a1111_names(client, ctx):
    body = {"width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
            "hr_second_pass_steps": 2, "hr_checkpoint_name": "other", "hr_sampler_name": "Euler",
            "hr_prompt": "sharp", "denoising_strength": 0.3, "hr_resize_x": 0}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200, client.post("/sdapi/v1/txt2img", json=body).text
    request = ctx.jobs.submitted[0][1]
    assert (request.enable_hr, request.hr_scale, request.hr_upscaler, request.hr_second_pass_steps) == (
        True, 1.5, "Lanczos", 2)
    assert (request.hr_checkpoint, request.hr_sampler, request.hr_prompt, request.denoising_strength) == (
        "other", "Euler", "sharp", 0.3)


def test_upscaler_lists_come_from_the_hires_lane(client, ctx):
    from pipelines import upscalers

    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()] == list(upscalers.LATENT_MODES)
    folder = ctx.settings.models_root / "RealESRGAN"
    folder.mkdir(parents=True)
    (folder / "RealESRGAN_x4plus.pth").write_bytes(b"weights")
    assert [m["name"] for m in client.get("/sdapi/v1/realesrgan-models").json()] == ["RealESRGAN_x4plus"]
    assert "RealESRGAN_x4plus" in [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert client.get("/sdapi/v1/face-restorers").json() == []


# --- ControlNet ----------------------------------------------------------------------------------

def square(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size))
    image.paste((255, 255, 255), (16, 16, size - 16, size - 16))
    return image


def test_controlnet_units_from_alwayson_scripts(client, ctx):
    unit = {"image": b64_png(square(), data_url=True), "mask": None, "module": "canny", "model": "control_v11p_sd15_canny",
            "weight": 0.5, "resize_mode": "Resize and Fill", "low_vram": False, "processor_res": 512,
            "threshold_a": 64, "threshold_b": 64, "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": 2,
            "pixel_perfect": False, "hr_option": "Both", "enabled": True}
    body = {"width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    (got,) = ctx.jobs.submitted[0][1].control_units
    assert (got.module, got.model, got.weight, got.guidance_start, got.guidance_end) == (
        "canny", "control_v11p_sd15_canny", 0.5, 0.1, 0.9)
    assert (got.control_mode, got.resize_mode, got.threshold_a) == ("ControlNet is more important", "Resize and Fill", 64)
    assert got.image.convert("RGB").tobytes() == square().tobytes()
    # webuiapi always sends an empty ControlNet entry once /scripts lists it.
    empty = {"width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": []}}}
    assert client.post("/sdapi/v1/txt2img", json=empty).status_code == 200
    assert ctx.jobs.submitted[1][1].control_units == ()
    for image in ("/etc/passwd", "https://example.com/a.png", {"image": "file:///etc/passwd"}):
        bad = {"width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": [{"image": image}]}}}
        response = client.post("/sdapi/v1/txt2img", json=bad)
        assert response.status_code == 422 and "ControlNet unit 0 image" in response.json()["detail"]


def test_controlnet_routes(client):
    from pipelines.control import preprocessors

    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list").json() == {"model_list": ["control_v11p_sd15_canny"]}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"] == preprocessors.names()
    assert [s["name"] for s in modules["module_detail"]["canny"]["sliders"]] == [
        "Preprocessor Resolution", "Canny low threshold", "Canny high threshold"]
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["model_list"] == ["None", "control_v11p_sd15_canny"] and "canny" in types["Canny"]["module_list"]
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}


@pytest.mark.parametrize("key", ["controlnet_input_images", "controlnet_images"])
def test_controlnet_detect_accepts_both_image_keys(client, key):
    from pipelines.control import preprocessors

    body = {"controlnet_module": "canny", key: [b64_png(square(), data_url=True)], "controlnet_processor_res": 64,
            "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}
    data = client.post("/controlnet/detect", json=body).json()
    expected = preprocessors.detect("canny", square(), resolution=64, threshold_a=50, threshold_b=150)
    assert data["info"] == "Success" and len(data["images"]) == 1
    got = decode(data["images"][0]).convert("RGB")
    assert got.tobytes() == expected.tobytes() and len(np.unique(np.asarray(got))) == 2  # edges and background


def test_controlnet_detect_errors_are_422(client):
    image = b64_png(square())
    for body, message in (({"controlnet_module": "canny"}, "must hold at least one base64 image"),
                          ({"controlnet_module": "nope", "controlnet_images": [image]}, "unknown ControlNet preprocessor"),
                          ({"controlnet_module": "depth_midas", "controlnet_images": [image]}, "needs its annotator network"),
                          ({"controlnet_module": "canny", "controlnet_images": ["/etc/passwd"]}, "file paths are not accepted")):
        response = client.post("/controlnet/detect", json=body)
        assert response.status_code == 422 and message in response.json()["detail"]


def test_styles_and_clip_skip_reach_the_request(client, ctx):
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "noir", "prompt": "{prompt}, black and white", "negative_prompt": "colour"}]
    body = {"width": 64, "height": 64, "styles": ["noir"], "override_settings": {"CLIP_stop_at_last_layers": 2}}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    request = ctx.jobs.submitted[0][1]
    assert request.styles == ("noir",) and request.clip_skip == 2
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3})
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64})
    assert ctx.jobs.submitted[1][1].clip_skip == 3


def test_extras_upscale_keeps_parameters_and_adds_postprocessing(client):
    from pipelines.metadata import image_bytes_with_infotext

    source = Image.new("RGB", (8, 4), "red")
    source.paste((0, 0, 255), (0, 0, 4, 4))
    b64 = base64.b64encode(image_bytes_with_infotext(source, "a cat\nSteps: 3, Sampler: Euler, Seed: 1", "png")).decode()
    body = {"image": "data:image/png;base64," + b64, "upscaler_1": "Nearest", "upscaling_resize": 2}
    data = client.post("/sdapi/v1/extra-single-image", json=body).json()
    assert data["html_info"] == "Postprocess upscale by: 2, Postprocess upscaler: Nearest"
    image = decode(data["image"])
    expected = np.asarray(source).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    assert image.text["parameters"].startswith("a cat") and image.text["postprocessing"] == data["html_info"]
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64, "name": "a.png"}, {"data": b64, "name": "b.png"}], "resize_mode": 1,
        "upscaling_resize_w": 16, "upscaling_resize_h": 8, "upscaler_1": "Lanczos"}).json()
    assert [decode(i).size for i in batch["images"]] == [(16, 8), (16, 8)]
    bad = client.post("/sdapi/v1/extra-single-image", json={**body, "gfpgan_visibility": 1})
    assert bad.status_code == 422 and "face restoration" in bad.json()["detail"]
    assert client.post("/sdapi/v1/extra-batch-images", json={"imageList": []}).status_code == 422


def test_the_default_checkpoint_is_pinned_at_start(client, ctx):
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd15.safetensors"
    models = ctx.settings.data_dir / "models" / "Stable-diffusion"
    stripped.write_stripped(models / "a-merge.safetensors", stripped.sd1_layout())  # sorts first
    ctx.registry.refresh()
    assert ctx.registry.default_checkpoint().name == "a-merge.safetensors"
    client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64})
    assert ctx.jobs.submitted[0][1].checkpoint == "sd15.safetensors"


def test_a_pasted_infotext_fills_the_fields_the_request_leaves_out(client, ctx):
    text = ('a cat\nNegative prompt: dog\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, '
            'Seed: 99, Size: 64x128, Clip skip: 2, Hires upscale: 1.5, Hires upscaler: Lanczos')
    body = {"infotext": text, "seed": 7, "save_images": False}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    request = ctx.jobs.submitted[0][1]
    assert (request.prompt, request.negative_prompt, request.steps, request.sampler, request.schedule) == (
        "a cat", "dog", 12, "DPM++ 2M", "Karras")
    assert (request.cfg_scale, request.width, request.height, request.clip_skip) == (4.5, 64, 128, 2)
    assert request.seed == 7  # given in the request: it wins
    assert (request.enable_hr, request.hr_scale, request.hr_upscaler) == (True, 1.5, "Lanczos")


# --- image URLs (off unless config.json says "api_enable_requests": true) -------------------------

def test_urls_when_enabled_still_never_reach_local_or_private_addresses(ctx):
    ctx.settings.config_file.write_text(json.dumps({"api_enable_requests": True}))
    client = make_client(ctx)
    assert client.get("/sdapi/v1/options").json()["api_enable_requests"] is True
    client.post("/sdapi/v1/options", json={"api_enable_requests": False})  # the API cannot change it
    assert client.get("/sdapi/v1/options").json()["api_enable_requests"] is True
    for url, message in (("http://127.0.0.1:1/x.png", "not a public address"), ("http://localhost/x.png", "not a public address"),
                         ("http://10.0.0.8/x.png", "not a public address"), ("http://169.254.169.254/latest", "not a public address"),
                         ("http://[::1]/x.png", "not a public address"), ("file:///etc/passwd", "only http(s)"),
                         ("ftp://example.com/x.png", "only http(s)")):
        response = client.post("/sdapi/v1/img2img", json={"init_images": [url], "width": 64, "height": 64})
        assert response.status_code == 422 and message in response.json()["detail"], (url, response.text)
    assert ctx.jobs.submitted == []


def test_fetch_reads_the_image_from_the_checked_address_without_redirects(tmp_path):
    import http.server
    import threading

    from api import fetch

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(png, "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1/secret")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        # A name that "resolves" to the test server; loopback allowed only for this test.
        kwargs = dict(resolve=lambda host, p: ["127.0.0.1"], allowed=lambda address: True)
        data = fetch.fetch(f"http://images.example:{port}/cat.png", 1 << 20, **kwargs)
        assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (0, 128, 0)
        with pytest.raises(ValueError, match="HTTP 302"):
            fetch.fetch(f"http://images.example:{port}/moved", 1 << 20, **kwargs)
        with pytest.raises(ValueError, match="larger than"):
            fetch.fetch(f"http://images.example:{port}/cat.png", 10, **kwargs)
        with pytest.raises(ValueError, match="not a public address"):  # the real check refuses loopback
            fetch.fetch(f"http://127.0.0.1:{port}/cat.png", 1 << 20)
    finally:
        server.shutdown()


# --- README: the flag and every route are documented -----------------------------------------------

def test_readme_documents_the_api_flags_and_every_rest_route(client):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    (api_row,) = [line for line in lines if line.startswith("| `--api` ")]
    assert "later version" not in api_row and "/sdapi/v1" in api_row
    assert any(line.startswith("| `--api-auth ") for line in lines)
    section = readme.split("\n## AUTOMATIC1111 REST API")[1].split("\n## ")[0]
    paths = client.get("/openapi.json").json()["paths"]
    names = [path.removeprefix("/sdapi/v1/").removeprefix("/controlnet/") for path in paths]
    names = [name for name in names if "/" not in name and "{" not in name]  # extension install routes: their own section
    assert len(names) == 40  # 34 /sdapi/v1 routes (GET and POST options are one path) + 6 /controlnet
    missing = [name for name in names if f"`{name}`" not in section and f"/{name}`" not in section]
    assert missing == []


# --- ControlNet units: legacy aliases and masks ----------------------------------------------------

def unit_request(client, ctx, unit, path="txt2img"):
    body = {"width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    if path == "img2img":
        body["init_images"] = [b64_png(Image.new("RGB", (64, 64), "grey"))]
    response = client.post(f"/sdapi/v1/{path}", json=body)
    if response.status_code != 200:
        return response
    return ctx.jobs.submitted[-1][1].control_units


def stroke_mask() -> Image.Image:
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (8, 30, 56, 34))  # a white line on black: what a sketch canvas sends
    return mask


def test_controlnet_legacy_field_aliases(client, ctx):
    base = {"module": "canny", "model": "control_v11p_sd15_canny"}
    (unit,) = unit_request(client, ctx, {**base, "input_image": b64_png(square()), "guidance": 0.6, "lowvram": True,
                                         "guidance_start": 0.2})
    assert (unit.guidance_start, unit.guidance_end) == (0.2, 0.6)
    assert unit.image.convert("RGB").tobytes() == square().tobytes()
    for both, names in (({"guidance": 0.5, "guidance_end": 0.7}, "'guidance_end' or its old name 'guidance'"),
                        ({"input_image": b64_png(square()), "image": b64_png(square())}, "'image' or its old name 'input_image'")):
        response = unit_request(client, ctx, {**base, **both})
        assert response.status_code == 422 and names in response.json()["detail"]


@pytest.mark.parametrize("shape", ["mask", "mask_image", "dict", "pair"])
def test_a_controlnet_unit_mask_becomes_its_control_image_as_in_the_extension(client, ctx, shape):
    image, mask = b64_png(square()), b64_png(stroke_mask(), data_url=True)
    unit = {"module": "canny", "model": "control_v11p_sd15_canny", "threshold_a": 50}
    unit |= {"mask": {"image": image, "mask": mask}, "mask_image": {"image": image, "mask_image": mask},
             "dict": {"image": {"image": image, "mask": mask}}, "pair": {"image": [image, mask]}}[shape]
    (got,) = unit_request(client, ctx, unit)
    # The extension's rule for non-inpaint preprocessors: the drawn mask is the map, preprocessor "none".
    assert got.module == "none" and got.image.convert("RGB").tobytes() == stroke_mask().tobytes()
    assert (got.model, got.threshold_a) == ("control_v11p_sd15_canny", 50)


def test_a_blank_controlnet_mask_is_no_mask_and_other_masks_are_refused_by_name(client, ctx):
    image = b64_png(square())
    blank = b64_png(Image.new("L", (64, 64), 0))  # an untouched canvas
    (got,) = unit_request(client, ctx, {"module": "canny", "model": "control_v11p_sd15_canny", "image": image,
                                        "mask": blank})
    assert got.module == "canny" and got.image.convert("RGB").tobytes() == square().tobytes()
    stroke = b64_png(stroke_mask())
    for unit, message in (
            ({"module": "inpaint_only", "image": image, "mask": stroke}, "ControlNet unit 0 mask: the 'inpaint_only' inpaint"),
            ({"module": "canny", "image": image, "mask": "/etc/passwd"}, "ControlNet unit 0 mask: file paths are not accepted"),
            ({"module": "canny", "image": image, "mask": "bm90IGFuIGltYWdl"}, "ControlNet unit 0 mask: the upload is not"),
            ({"module": "canny", "image": {"image": image, "mask": stroke}, "mask": stroke}, "the mask is given twice"),
            ({"module": "canny", "image": [image, stroke, stroke]}, "a list must be [image, mask]"),
            ({"module": "canny", "image": image, "effective_region_mask": stroke}, "effective_region_mask")):
        response = unit_request(client, ctx, {"model": "control_v11p_sd15_canny", **unit}, path="img2img")
        assert response.status_code == 422 and message in response.json()["detail"], (unit, response.text)
    assert len(ctx.jobs.submitted) == 1


def test_controlnet_detect_refuses_masks_it_cannot_use(client):
    image = b64_png(square())
    body = {"controlnet_module": "canny", "controlnet_input_images": [image], "controlnet_processor_res": 64}
    for empty in (None, [], [""]):  # what clients send without a mask
        assert client.post("/controlnet/detect", json={**body, "controlnet_masks": empty}).status_code == 200
    response = client.post("/controlnet/detect", json={**body, "controlnet_masks": [b64_png(stroke_mask())]})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("controlnet_masks[0]: the 'canny' preprocessor takes no mask")


def test_a_script_name_easel_cannot_run_is_refused(client, ctx):
    response = client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "script_name": "x/y/z plot"})
    assert response.status_code == 422 and "script_name 'x/y/z plot' is not available" in response.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "script_name": None}).status_code == 200


# --- the remaining A1111 routes ------------------------------------------------------------------

def test_refresh_routes_pick_up_new_files(client, ctx):
    models = ctx.settings.data_dir / "models"
    stripped.write_stripped(models / "Stable-diffusion" / "new-merge.safetensors", stripped.sd1_layout())
    stripped.write_stripped(models / "VAE" / "new-vae.safetensors", stripped.vae_layout())
    assert "new-merge" not in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert client.post("/sdapi/v1/refresh-checkpoints").json() is None
    assert "new-merge" in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    (models / "VAE" / "vae-ft-mse.safetensors").unlink()
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200
    assert [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()] == ["new-vae.safetensors"]
    # refresh-loras and refresh-embeddings pick up files written since the last scan.
    import torch
    from safetensors.torch import save_file
    from tests import factories

    lora = factories.write_tiny_lora(models / "Lora" / "sub" / "fresh.safetensors", seed=3,
                                     metadata={"ss_output_name": "freshStyle"})
    assert "fresh" not in [entry["name"] for entry in client.get("/sdapi/v1/loras").json()]
    assert client.post("/sdapi/v1/refresh-loras").json() is None
    listed = {entry["name"]: entry for entry in client.get("/sdapi/v1/loras").json()}
    assert set(listed) == {"styleA_v3", "fresh"}
    assert listed["fresh"]["alias"] == "freshStyle" and listed["fresh"]["path"] == str(lora)
    embeddings = ctx.settings.data_dir / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.zeros(2, 768)}, str(embeddings / "fresh-emb.safetensors"))
    assert client.get("/sdapi/v1/embeddings").json()["loaded"] == {}
    assert client.post("/sdapi/v1/refresh-embeddings").json() is None
    assert client.get("/sdapi/v1/embeddings").json()["loaded"] == {"fresh-emb": {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 2}}


def test_hypernetworks_list_a1111_files(client, ctx):
    from tests import factories

    assert client.get("/sdapi/v1/hypernetworks").json() == []
    path = factories.write_tiny_hypernetwork(ctx.settings.data_dir / "models" / "hypernetworks" / "tinyhn.pt")
    client.post("/sdapi/v1/refresh-checkpoints")
    assert client.get("/sdapi/v1/hypernetworks").json() == [{"name": "tinyhn", "path": str(path)}]


def test_script_info_has_a1111s_shape(client):
    info = client.get("/sdapi/v1/script-info").json()
    assert [(s["name"], s["is_alwayson"], s["is_img2img"]) for s in info] == [
        ("controlnet", True, False), ("controlnet", True, True)]
    for script in info:
        assert set(script) == {"name", "is_alwayson", "is_img2img", "args"}
        assert [a["label"] for a in script["args"]] == ["ControlNet Unit 0", "ControlNet Unit 1", "ControlNet Unit 2"]
        for arg in script["args"]:
            assert set(arg) == {"label", "value", "minimum", "maximum", "step", "choices"}


def test_cmd_flags_never_show_passwords(ctx, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("carol:file-secret\n")
    ctx.settings = Settings(data_dir=ctx.settings.data_dir, api=True, auth="alice:ui-secret",
                            api_auth="bob:api-secret", auth_file=users)
    response = make_client(ctx, [AUTH]).get("/sdapi/v1/cmd-flags", auth=AUTH)
    flags = response.json()
    assert (flags["auth"], flags["api_auth"], flags["auth_file"]) == ("***", "***", "***")
    assert flags["api"] is True and flags["port"] == ctx.settings.port
    for secret in ("ui-secret", "api-secret", "users.txt", "alice", "bob"):
        assert secret not in response.text


A1111_INFO_KEYS = {  # A1111 v1.10 Processed.js()
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version"}


def test_txt2img_info_has_every_a1111_key_with_per_image_prompts(client, ctx):
    body = {"prompt": "a cat", "negative_prompt": "dog", "width": 64, "height": 64, "seed": 3, "n_iter": 2,
            "steps": 4, "cfg_scale": 6}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert A1111_INFO_KEYS <= set(info)
    assert (info["all_prompts"], info["all_negative_prompts"], info["all_seeds"]) == (["a cat"] * 2, ["dog"] * 2, [3, 4])
    assert (info["steps"], info["cfg_scale"], info["width"], info["batch_size"]) == (4, 6, 64, 1)
    assert len(info["job_timestamp"]) == 14 and info["version"] == "easel-test" and info["denoising_strength"] is None
    assert isinstance(info["extra_generation_params"], dict) and info["infotexts"][1].startswith("a cat\n")


# --- auth: constant-time compare, the same work for unknown names -------------------------------------

def test_basic_auth_compares_with_hmac_compare_digest_and_unknown_or_wrong_are_401(ctx, monkeypatch):
    import hmac

    client = make_client(ctx, [AUTH])
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert client.get("/sdapi/v1/options", auth=AUTH).status_code == 200
    assert calls == [(b"s3cret", b"s3cret")]
    for credentials in (("alice", "wrong"), ("mallory", "s3cret")):
        calls.clear()
        response = client.get("/sdapi/v1/options", auth=credentials)
        assert response.status_code == 401 and response.json()["detail"] == "Incorrect username or password"
        (compared,) = calls  # the unknown name, too, costs one constant-time compare
        assert compared[1] == credentials[1].encode()


def test_an_unknown_name_costs_the_same_pbkdf2_rounds_as_a_hashed_user(monkeypatch):
    import hashlib

    authenticator = Authenticator([User("hashed", hash_password("pw", iterations=3000)), User("plain", "pw2"),
                                   User("older", hash_password("pw3", iterations=1500))])
    rounds = []
    real = hashlib.pbkdf2_hmac

    def recording(name, password, salt, iterations, *args):
        rounds.append(iterations)
        return real(name, password, salt, iterations, *args)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", recording)
    assert authenticator("hashed", "pw") and not authenticator("hashed", "nope")
    assert rounds == [3000, 3000]
    rounds.clear()
    assert not authenticator("nobody", "pw") and not authenticator("", "")
    assert rounds == [3000, 3000]  # the costliest real check, not a cheap stand-in
    rounds.clear()
    only_plain = Authenticator([User("plain", "pw2")])
    assert not only_plain("nobody", "pw2") and rounds == []  # plain users: a plain compare for everyone


# --- the real engine behind the routes: skip, unload/reload, loads during a running job ---------------

@pytest.fixture(scope="module")
def engine_models(tmp_path_factory):
    from tests import factories

    models = tmp_path_factory.mktemp("engine") / "models"
    factories.write_tiny_checkpoint(models / "Stable-diffusion" / "tinyA.safetensors", seed=0)
    factories.write_tiny_checkpoint(models / "Stable-diffusion" / "tinyB.safetensors", seed=1)
    return models


@pytest.fixture(scope="module")
def engine_manager(engine_models, tmp_path_factory):
    import torch

    from pipelines.cache import ModelCache
    from pipelines.manager import PipelineManager

    own = tmp_path_factory.mktemp("engine-data")
    paths = ModelPaths(models_dir=engine_models, embeddings_dir=own / "embeddings", builtin_dir=own / "no-builtin")
    registry = ModelRegistry(paths, HashCache(own / "cache.json"))
    registry.refresh()
    return PipelineManager(registry, ModelCache(1 << 30), torch.device("cpu"), torch.float32)


class StepHook:
    """Called from the device worker after each reported step; `at` (batch, step) runs `action`
    there, once, and may block the worker (which holds the engine) until the test says go on."""

    def __init__(self):
        self.at, self.action = None, None

    def __call__(self, progress):
        if self.at == (progress.batch_index, progress.step):
            self.at = None
            self.action()


@pytest.fixture()
def engine_ctx(engine_manager, engine_models, tmp_path):
    from pipelines.generate import generate
    from pipelines.jobs import JobQueue

    hook = StepHook()

    def run(request, report, token):
        def progress(event):
            report(event)
            hook(event)
        return generate(engine_manager, None, request, progress, token)

    jobs = JobQueue(run)
    settings = Settings(data_dir=tmp_path / "data", models_dir=engine_models, api=True)
    yield SimpleNamespace(settings=settings, registry=engine_manager.registry, manager=engine_manager, jobs=jobs,
                          prompts=None, hook=hook)
    jobs.stop()


WAIT_S = 600  # only reached when something hangs; a busy CI machine can take long per step
ENGINE_BODY = {"prompt": "a red square", "negative_prompt": "", "steps": 2, "cfg_scale": 5, "width": 64,
               "height": 64, "seed": 11, "sampler_name": "Euler", "n_iter": 3}


def pixels_of(data) -> list:
    return [np.asarray(decode(b64).convert("RGB")) for b64 in data["images"]]


def post_in_background(client, path, body=None):
    outcome = {}

    def call():
        outcome["response"] = client.post(path, json=body)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, outcome


def test_skip_ends_only_the_current_image_and_the_batch_goes_on(engine_ctx):
    client = make_client(engine_ctx)
    plain = client.post("/sdapi/v1/txt2img", json=ENGINE_BODY).json()

    def run_with(route):
        """The same request; during image 1, step 1, `route` is posted (the worker waits for it)."""
        posted = threading.Event()
        engine_ctx.hook.at = (0, 1)
        engine_ctx.hook.action = lambda: posted.wait(WAIT_S)
        thread, outcome = post_in_background(client, "/sdapi/v1/txt2img", ENGINE_BODY)
        deadline = time.monotonic() + WAIT_S
        while engine_ctx.hook.at is not None:  # the worker reached image 1, step 1
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        progress = client.get("/sdapi/v1/progress").json()
        assert client.post(f"/sdapi/v1/{route}").json() == {}
        after = client.get("/sdapi/v1/progress").json()
        posted.set()
        thread.join(WAIT_S)
        return outcome["response"].json(), progress, after

    skipped, during, after_skip = run_with("skip")
    assert during["state"]["sampling_step"] == 1 and during["state"]["skipped"] is False
    assert after_skip["state"]["skipped"] is True and after_skip["state"]["interrupted"] is False
    interrupted, _, _ = run_with("interrupt")
    full, cut, rest = pixels_of(plain), pixels_of(skipped), pixels_of(interrupted)
    assert json.loads(skipped["info"])["all_seeds"] == [11, 12, 13] and len(full) == 3
    # A1111: the skipped image comes back as sampled so far, the others in full.
    assert len(rest) == 1 < len(cut) == 3
    assert not np.array_equal(cut[0], full[0]) and np.array_equal(rest[0], cut[0])
    assert np.array_equal(cut[1], full[1]) and np.array_equal(cut[2], full[2])
    assert json.loads(skipped["info"])["interrupted"] is False and json.loads(interrupted["info"])["interrupted"]


def test_unload_and_reload_checkpoint(engine_ctx):
    client = make_client(engine_ctx)
    client.post("/sdapi/v1/txt2img", json={**ENGINE_BODY, "n_iter": 1, "steps": 1})
    assert engine_ctx.manager.snapshot()["checkpoint"] == "tinyA.safetensors"
    loads = dict(engine_ctx.manager.load_counts)
    assert client.post("/sdapi/v1/unload-checkpoint").json() is None
    assert engine_ctx.manager.snapshot()["checkpoint"] is None
    assert client.post("/sdapi/v1/reload-checkpoint").json() is None
    assert engine_ctx.manager.snapshot()["checkpoint"] == "tinyA.safetensors"
    assert dict(engine_ctx.manager.load_counts) == loads  # back from the RAM cache, not from disk


@pytest.mark.parametrize("route, body", [("options", {"sd_model_checkpoint": "tinyB"}), ("reload-checkpoint", None)])
def test_a_load_asked_for_during_a_job_waits_for_it_and_leaves_its_result_alone(engine_ctx, route, body):
    client = make_client(engine_ctx)
    request = {**ENGINE_BODY, "n_iter": 1}
    # Both checkpoints in the RAM cache first: a swap would then take a moment, not a disk read.
    client.post("/sdapi/v1/txt2img", json={**request, "steps": 1, "override_settings": {"sd_model_checkpoint": "tinyB"}})
    alone = pixels_of(client.post("/sdapi/v1/txt2img", json=request).json())
    if route == "reload-checkpoint":
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tinyB"})  # what reload brings back
    load = {}

    def ask_for_a_load():
        """On the worker, mid-job (it holds the engine): the POST starts and gets 3 s to finish."""
        load["thread"], load["outcome"] = post_in_background(client, f"/sdapi/v1/{route}", body)
        load["thread"].join(3.0)
        load["done_during_job"] = not load["thread"].is_alive()

    engine_ctx.hook.at, engine_ctx.hook.action = (0, 2), ask_for_a_load
    during = client.post("/sdapi/v1/txt2img", json={**request, "override_settings": {"sd_model_checkpoint": "tinyA"}})
    load["thread"].join(WAIT_S)
    assert load["done_during_job"] is False  # it waited for the job
    assert load["outcome"]["response"].status_code == 200
    assert json.loads(during.json()["info"])["sd_model_name"] == "tinyA"
    assert all(np.array_equal(a, b) for a, b in zip(alone, pixels_of(during.json())))
    assert engine_ctx.manager.snapshot()["checkpoint"] == "tinyB.safetensors"  # loaded once the job was done
