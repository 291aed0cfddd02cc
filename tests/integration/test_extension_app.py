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
    (data_dir / "config.json").write_text('{"extensions": {"starter": {"greeting": "bonjour"}}}')
    blocks, ctx = app.build_app(Settings(data_dir=data_dir))
    port = free_port()
    fastapi_app, _url, _share = blocks.launch(prevent_thread_lock=True, server_name="127.0.0.1",
                                              server_port=port, quiet=True)
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
