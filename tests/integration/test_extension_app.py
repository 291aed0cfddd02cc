"""The app with extensions: a user extension's tab and accordion are in the UI, its route answers
on the real server under /ext/<name>/, app_started ran, a broken extension is listed with its
error and the app still builds and serves."""
import socket

import pytest
import requests

import app
from pipelines.settings import Settings
from pipelines.request import GenerationRequest
from tests import factories
from tests.extension_repos import write_extension

APP_STARTED = '''
def register(api):
    api.on("app_started", lambda fastapi_app: api.log.info("started"))
    seen = []
    api.on("app_started", lambda fastapi_app: seen.append(type(fastapi_app).__name__))
    api.add_route("seen", lambda: {"seen": seen})
    api.add_route("echo/{word}", lambda word: {"word": word}, methods=("GET",))
    api.declare_setting("greeting", "hello")
    api.add_route("greeting", lambda: {"greeting": api.setting("greeting")})
'''


UI_BROKEN = '''
def register(api):
    def build(ui):
        raise RuntimeError("tab exploded")
    api.add_tab("Broken tab", build)
    api.on("app_started", lambda fastapi_app: 1 / 0)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ext-app")
    user = data_dir / "extensions"
    write_extension(user / "sample", name="sample")  # seed + 1, red border
    factories.write_tiny_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    write_extension(user / "starter", name="starter", body=APP_STARTED)
    write_extension(user / "broken", name="broken", body="raise RuntimeError('broken at import')\n")
    write_extension(user / "ui-broken", name="ui-broken", body=UI_BROKEN)
    (data_dir / "config.json").write_text('{"extensions": {"starter": {"greeting": "bonjour"}}}')
    blocks, ctx = app.build_app(Settings(data_dir=data_dir))
    port = free_port()
    fastapi_app, _url, _share = blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1",
                                              server_port=port, quiet=True)
    app.mount_rest_api(fastapi_app, ctx)  # /sdapi/v1 and /controlnet, open (no --api-auth / --auth)
    app.start_extensions(fastapi_app, ctx)
    try:
        yield blocks, ctx, f"http://127.0.0.1:{port}"
    finally:
        blocks.close()
        ctx.jobs.stop()


def test_extension_ui_is_built_and_broken_ones_are_listed(served):
    blocks, ctx, _url = served
    config = blocks.get_config_file()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    elem_ids = [c.get("props", {}).get("elem_id") for c in config["components"]]
    assert "Sample" in labels and "Sample options" in labels and "Extensions" in labels
    assert "sample_ext_markdown" in elem_ids
    markdown = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "sample_ext_markdown")
    assert markdown["props"]["value"] == "Sample extension: sample"  # the declared setting's default
    broken = ctx.extensions.find("broken")
    assert not broken.loaded and broken.error == "RuntimeError: broken at import"
    table = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "extensions_table")
    rows = {row[0]: row for row in table["props"]["value"]["data"]}
    assert rows["broken"][-1] == "error: RuntimeError: broken at import"
    assert rows["sample"][-1] == "loaded" and rows["starter"][-1] == "loaded"
    # on loopback the change buttons are enabled
    install = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "extensions_install")
    assert install["props"]["interactive"] is not False


def test_routes_are_served_under_ext_name_and_app_started_ran(served):
    _blocks, _ctx, url = served
    assert requests.get(f"{url}/ext/sample/ping", timeout=30).json() == {"version": "1.0"}
    assert requests.get(f"{url}/ext/starter/echo/hi", timeout=30).json() == {"word": "hi"}
    assert requests.get(f"{url}/ext/starter/seen", timeout=30).json() == {"seen": ["App"]}
    assert requests.get(f"{url}/ext/starter/greeting", timeout=30).json() == {"greeting": "bonjour"}
    assert requests.get(f"{url}/ext/broken/ping", timeout=30).status_code == 404
    assert requests.get(url + "/", timeout=30).status_code == 200  # Gradio still serves its page


def test_exposed_server_disables_the_buttons_and_says_why(tmp_path):
    blocks, _ctx = app.build_app(Settings(data_dir=tmp_path, listen=True))
    config = blocks.get_config_file()
    by_id = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
    assert by_id["extensions_install"]["props"]["interactive"] is False
    assert by_id["extensions_uninstall"]["props"]["interactive"] is False
    assert "--enable-insecure-extension-access" in by_id["extensions_access"]["props"]["value"]


def test_the_apps_job_queue_runs_the_extension_hooks(served):
    import numpy as np

    _blocks, ctx, _url = served
    request = GenerationRequest(prompt="a boat", width=64, height=64, steps=1, seed=10, save_images=False,
                                checkpoint="tiny.safetensors")
    result = ctx.jobs.submit(request, "test").result(timeout=300)
    assert result.seeds == [11] and "Sample ext: 1.0" in result.infotexts[0]
    pixels = np.asarray(result.images[0])
    assert (pixels[0] == (255, 0, 0)).all() and (pixels[:, -1] == (255, 0, 0)).all()


def _component(config, **props):
    return next(c for c in config["components"] if all(c.get("props", {}).get(k) == v for k, v in props.items()))


def test_a_broken_tab_and_app_started_hook_leave_the_app_serving(served):
    blocks, ctx, url = served
    record = ctx.extensions.find("ui-broken")
    assert record.loaded
    assert record.hook_errors == ["UI 'Broken tab': RuntimeError: tab exploded",
                                  "app_started: ZeroDivisionError: division by zero"]
    shown = [c["props"]["value"] for c in blocks.get_config_file()["components"]
             if c.get("type") == "markdown" and "tab exploded" in str(c["props"].get("value"))]
    assert shown == ["Extension **ui-broken** failed to build this part: `RuntimeError: tab exploded`"]
    assert requests.get(f"{url}/ext/sample/ping", timeout=30).json() == {"version": "1.0"}


def test_a_raising_ui_build_and_app_started_hook_are_logged_with_the_extension_name(tmp_path, caplog):
    import types

    import gradio as gr
    from fastapi import FastAPI

    from extensions.loader import load_extensions
    from ui.components import ComponentRegistry
    from ui.extension_slots import extension_tabs

    write_extension(tmp_path / "exts" / "ui-broken", name="ui-broken", body=UI_BROKEN)
    write_extension(tmp_path / "exts" / "sample", name="sample")
    ctx = types.SimpleNamespace(extensions=load_extensions(tmp_path / "none", tmp_path / "exts"),
                                settings=Settings(data_dir=tmp_path / "data"), authenticator=None)
    with caplog.at_level("ERROR", logger="easel.extensions"):
        with gr.Blocks() as blocks:
            with gr.Tabs():
                extension_tabs(ctx, ComponentRegistry())
        app.start_extensions(FastAPI(), ctx)
    logged = [r.getMessage() for r in caplog.records]
    assert "extension 'ui-broken': building 'Broken tab' failed" in logged
    assert "extension 'ui-broken': hook app_started failed; going on without it" in logged
    # the other extension's tab was built in the same Blocks
    assert _component(blocks.get_config_file(), elem_id="sample_ext_markdown")["props"]["value"] == \
        "Sample extension: sample"


SAMPLER = "Sample DDIM trailing"  # added by the sample extension (tests/extension_repos.py)


def test_the_extension_sampler_and_preprocessor_are_in_the_menus_and_the_api(served):
    import base64
    import io

    import numpy as np
    from PIL import Image

    blocks, ctx, url = served
    config = blocks.get_config_file()
    for elem_id in ("txt2img_sampler", "img2img_sampler"):
        choices = [c[1] if isinstance(c, (list, tuple)) else c for c in _component(config, elem_id=elem_id)["props"]["choices"]]
        assert choices[-1] == SAMPLER, elem_id
    hires = _component(config, label="Hires sampling method")["props"]["choices"]
    assert SAMPLER in [c[1] if isinstance(c, (list, tuple)) else c for c in hires]
    modules = _component(config, label="Preprocessor")["props"]["choices"]
    assert "sample-invert" in [c[1] if isinstance(c, (list, tuple)) else c for c in modules]

    assert SAMPLER in [s["name"] for s in requests.get(f"{url}/sdapi/v1/samplers", timeout=30).json()]
    listed = requests.get(f"{url}/controlnet/module_list", timeout=30).json()
    assert "sample-invert" in listed["module_list"] and "sample-invert" in listed["module_detail"]
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    detected = requests.post(f"{url}/controlnet/detect", timeout=60, json={
        "controlnet_module": "sample-invert", "controlnet_processor_res": 64,
        "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()]}).json()
    inverted = Image.open(io.BytesIO(base64.b64decode(detected["images"][0]))).convert("RGB")
    assert np.array_equal(np.asarray(inverted), 255 - pixels)

    made = ctx.extensions.find("sample").registered.samplers[SAMPLER].__globals__["made_schedulers"]
    before = len(made)
    answer = requests.post(f"{url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "a boat", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": SAMPLER,
        "override_settings": {"sd_model_checkpoint": "tiny.safetensors"}})
    assert answer.status_code == 200, answer.text
    assert "Sampler: Sample DDIM trailing" in answer.json()["info"] and len(made) == before + 1
    assert made[-1].timesteps.tolist() == [999, 499]
    refused = requests.post(f"{url}/sdapi/v1/txt2img", timeout=60, json={"prompt": "x", "sampler_name": "No such"})
    assert refused.status_code == 422 and SAMPLER in refused.text  # listed among the choices


def test_the_ui_request_builder_accepts_the_extension_sampler(served):
    from ui.request_builder import txt2img_request

    _blocks, ctx, _url = served
    values = {"prompt": "a kite", "sampler": SAMPLER, "steps": 2, "width": 64, "height": 64, "seed": 9,
              "checkpoint": "tiny.safetensors"}
    with pytest.raises(ValueError, match="Unknown sampler"):
        txt2img_request(values)  # without the app's additions
    request = txt2img_request(values, ctx.additions).with_changes(save_images=False)
    made = ctx.extensions.find("sample").registered.samplers[SAMPLER].__globals__["made_schedulers"]
    before = len(made)
    result = ctx.jobs.submit(request, "test").result(timeout=300)
    assert result.seeds == [10] and len(made) == before + 1  # the sample's seed shift ran too


AUTH_ROUTES = """
def register(api):
    api.add_route("secret", lambda: {"secret": 42})
"""


def test_extension_routes_are_behind_the_apps_login(tmp_path):
    import gradio as gr

    from extensions.loader import load_extensions

    write_extension(tmp_path / "exts" / "guarded", name="guarded", body=AUTH_ROUTES)
    settings = Settings(data_dir=tmp_path / "data", auth="ann:pw", api_auth="bot:key")
    ctx = types_namespace(settings=settings, authenticator=app.authenticator(settings),
                          extensions=load_extensions(tmp_path / "none", tmp_path / "exts"))
    with gr.Blocks() as blocks:
        gr.Markdown("login first")
    port = free_port()
    fastapi_app, _url, _share = blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port,
                                              quiet=True, auth=ctx.authenticator)
    url = f"http://127.0.0.1:{port}/ext/guarded/secret"
    try:
        app.start_extensions(fastapi_app, ctx)
        assert requests.get(url, timeout=30).status_code == 401  # anonymous
        assert requests.get(url, auth=("bot", "wrong"), timeout=30).status_code == 401
        assert requests.get(url, auth=("ann", "pw"), timeout=30).status_code == 401  # --api-auth replaces --auth for Basic
        assert requests.get(url, auth=("bot", "key"), timeout=30).json() == {"secret": 42}  # the API's users
        with requests.Session() as browser:  # the UI's login: Gradio's session cookie
            assert browser.post(f"http://127.0.0.1:{port}/login", data={"username": "ann", "password": "bad"},
                                timeout=30).status_code == 400
            assert browser.get(url, timeout=30).status_code == 401
            assert browser.post(f"http://127.0.0.1:{port}/login", data={"username": "ann", "password": "pw"},
                                timeout=30).json() == {"success": True}
            assert browser.get(url, timeout=30).json() == {"secret": 42}
    finally:
        blocks.close()


def types_namespace(**values):
    import types

    return types.SimpleNamespace(**values)
