"""Extensions end to end on a tiny model: install from a real local git repository (file://),
hooks that change the seed and draw a border, update to a new commit, disable, uninstall; broken
extensions that must not stop loading or generation; the access rule for exposed servers."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from extensions.actions import ExtensionActions
from extensions.loader import ExtensionSet, load_extensions
from extensions.state import ExtensionState
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests.extension_repos import commit_new_version, make_repo, write_extension

BASE = dict(prompt="a red circle", width=64, height=64, steps=2, cfg_scale=5, sampler="Euler",
            checkpoint="tinyA.safetensors", save_images=False)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def run(manager, hooks=None, outputs=None, **changes):
    kwargs = {"hooks": hooks} if hooks is not None else {}
    return generate(manager, outputs, GenerationRequest(**{**BASE, **changes}), **kwargs)


def border_and_inside(image):
    a = np.asarray(image)
    edge = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                           a[:, -2:].reshape(-1, 3)])
    return edge, a[2:-2, 2:-2]


def actions_for(data_dir: Path, builtin_dir: Path, **settings) -> ExtensionActions:
    s = Settings(data_dir=data_dir, **settings)
    return ExtensionActions(s, ExtensionSet([]), builtin_dir)


def load(actions: ExtensionActions) -> ExtensionSet:
    state = actions.state
    return load_extensions(actions.builtin_dir, actions.user_dir, state.disabled(), state.setting_values())


@pytest.fixture(scope="module")
def plain(engine):
    """The same requests without extensions: seed 100 and seed 101."""
    manager, _ = engine
    return {seed: run(manager, seed=seed).images[0] for seed in (100, 101)}


def test_install_hooks_update_disable_uninstall_from_a_local_git_repo(engine, plain, tmp_path):
    manager, outputs = engine
    repo = tmp_path / "repo"
    first_commit = make_repo(repo, border=RED)
    actions = actions_for(tmp_path / "data", tmp_path / "no-builtin")

    message = actions.install(f"file://{repo}", "", "", None)
    installed = tmp_path / "data" / "extensions" / "sample"
    assert (installed / ".git").is_dir() and "Installed **sample** 1.0" in message
    assert "easel-surely-not-installed-pkg" in message and "packaging" not in message.split("installed:")[-1]
    row = actions.rows()[0]
    assert (row.name, row.version, row.source_url, row.commit) == ("sample", "1.0", f"file://{repo}", first_commit)
    assert row.status == "installed; restart to load"

    exts = load(actions)
    record = exts.find("sample")
    assert record.loaded and record.error is None and record.load_time_s > 0
    assert [title for _r, title, _b in exts.tabs()] == ["Sample"]
    assert [title for _r, title, _b in exts.accordions("txt2img")] == ["Sample options"]
    assert list(exts.preprocessors()) == ["sample-invert"]
    assert [r.path for r in exts.routes()] == ["/ext/sample/ping"]

    result = run(manager, hooks=exts.hooks(), outputs=outputs, seed=100, save_images=True)
    # before_generate moved the seed: infotext, seeds and pixels are those of seed 101
    assert result.seeds == [101]
    fields = parse_infotext(result.infotexts[0])
    assert str(fields["Seed"]) == "101" and fields["Sample ext"] == "1.0"
    edge, inside = border_and_inside(result.images[0])
    assert (edge == RED).all()
    assert np.array_equal(inside, border_and_inside(plain[101])[1])
    with __import__("PIL.Image").Image.open(result.paths[0]) as saved:  # the saved file has the border
        assert (border_and_inside(saved.convert("RGB"))[0] == RED).all()

    # a new commit upstream: check, update, and the new code runs after a reload
    new_commit = commit_new_version(repo, version="2.0", border=BLUE)
    assert "update available" in actions.check_update("sample", None)
    assert "updated to" in actions.update("sample", None)
    assert actions.rows()[0].commit == new_commit and actions.rows()[0].version == "2.0"
    running = ExtensionActions(actions.settings, exts, actions.builtin_dir)  # this run loaded 1.0
    assert running.rows()[0].status == "loaded (1.0; restart to run 2.0)"
    exts = load(actions)
    edge, _inside = border_and_inside(run(manager, hooks=exts.hooks(), seed=100).images[0])
    assert (edge == BLUE).all()
    assert "up to date" in actions.check_update("sample", None)

    # disabled: still installed, not loaded, generation is the plain one
    actions.set_enabled("sample", False, None)
    exts = load(actions)
    assert not exts.find("sample").loaded and not exts.find("sample").enabled
    assert run(manager, hooks=exts.hooks(), seed=100).images[0].tobytes() == plain[100].tobytes()
    actions.set_enabled("sample", True, None)
    assert load(actions).find("sample").loaded

    actions.uninstall("sample", None)
    assert not installed.exists() and actions.rows() == []
    assert ExtensionState(tmp_path / "data").disabled() == set()


def test_install_at_a_commit_is_pinned_and_at_a_branch_follows_it(tmp_path):
    from tests.extension_repos import git

    repo = tmp_path / "repo"
    first = make_repo(repo)
    commit_new_version(repo, version="2.0")
    actions = actions_for(tmp_path / "data", tmp_path / "none")
    actions.install(str(repo), None, first, None)
    assert actions.rows()[0].commit == first and actions.rows()[0].version == "1.0"
    assert "pinned" in actions.check_update("sample", None)
    actions.uninstall("sample", None)

    git("checkout", "--quiet", "-b", "dev", cwd=repo)
    dev = commit_new_version(repo, version="3.0-dev")
    git("checkout", "--quiet", "main", cwd=repo)
    actions.install(f"file://{repo}", "dev", None, None)
    assert (actions.rows()[0].commit, actions.rows()[0].version) == (dev, "3.0-dev")
    git("checkout", "--quiet", "dev", cwd=repo)
    newer = commit_new_version(repo, version="3.1-dev")
    assert "updated to" in actions.update("sample", None) and actions.rows()[0].commit == newer


def test_install_from_zip_and_folder_and_from_an_index(tmp_path):
    import json
    import shutil

    source = write_extension(tmp_path / "src" / "zipped-ext", name="zipped")
    archive = shutil.make_archive(str(tmp_path / "zipped"), "zip", root_dir=tmp_path / "src")
    (source / "install.py").write_text("raise SystemExit('must never run')\n")
    actions = actions_for(tmp_path / "data", tmp_path / "none")
    assert "Installed **zipped**" in actions.install(archive, "", "", None)
    folder_message = actions.install(str(write_extension(tmp_path / "plain-folder", name="foldered")), "", "", None)
    assert "Installed **foldered**" in folder_message
    with pytest.raises(ValueError, match="already installed"):
        actions.install(archive, "", "", None)

    repo = tmp_path / "indexed-repo"
    make_repo(repo, name="indexed")
    (source / "install.py").unlink()
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"extensions": [
        {"name": "indexed", "url": f"file://{repo}", "description": "adds borders", "tags": ["image"]},
        {"name": "other", "url": "file:///nowhere", "description": "something else", "tags": []}]}))
    found = actions.search_index(str(index), "BORDERS", None)
    assert [row[0] for row in found] == ["indexed"]
    assert "Installed **indexed**" in actions.install_from_index(str(index), "indexed", None)
    assert sorted(actions.names()) == ["foldered", "indexed", "zipped"]


def test_install_scripts_are_reported_never_run(tmp_path):
    folder = write_extension(tmp_path / "with-script", name="scripted")
    marker = tmp_path / "ran"
    (folder / "install.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    actions = actions_for(tmp_path / "data", tmp_path / "none")
    message = actions.install(str(folder), "", "", None)
    assert "install.py, which Easel does not run" in message and not marker.exists()


def test_requirements_install_only_after_confirmation(tmp_path):
    actions = actions_for(tmp_path / "data", tmp_path / "none")
    actions.install(str(write_extension(tmp_path / "f", name="needs")), "", "", None)
    declared, missing = actions.requirements_of("needs")
    assert missing == ["easel-surely-not-installed-pkg==0.0.1"] and len(declared) == 2
    calls = []
    fake_pip = lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(returncode=0, stdout="", stderr="")
    with pytest.raises(ValueError, match="I trust these packages"):
        actions.install_requirements("needs", False, None, run=fake_pip)
    assert calls == []
    actions.install_requirements("needs", True, None, run=fake_pip)
    # only the missing package, with the app's own interpreter (its environment)
    assert calls == [[sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                      "easel-surely-not-installed-pkg==0.0.1"]]


def test_broken_extensions_do_not_stop_loading_or_generation(engine, plain, tmp_path):
    manager, _ = engine
    user = tmp_path / "exts"
    write_extension(user / "import-error", name="import-error", body="import no_such_module_here\n")
    write_extension(user / "raising", name="raising", body=(
        "def register(api):\n"
        "    def boom(*args):\n"
        "        raise RuntimeError('hook exploded')\n"
        "    for hook in ('before_generate', 'on_step', 'after_image', 'image_saved', 'model_loaded'):\n"
        "        api.on(hook, boom)\n"
        "    api.add_infotext_field('Broken', boom)\n"))
    write_extension(user / "wrong-return", name="wrong-return", body=(
        "def register(api):\n"
        "    api.on('before_generate', lambda request: 'not a request')\n"))
    write_extension(user / "future", name="future", api_version=99)
    (user / "no-manifest").mkdir()
    write_extension(user / "good", name="good", border=RED, seed_shift=0)

    exts = load_extensions(tmp_path / "none", user)
    by_name = {r.name: r for r in exts.records}
    assert "ModuleNotFoundError" in by_name["import-error"].error and not by_name["import-error"].loaded
    assert by_name["future"].error == ("extension 'future' needs extension API v99, Easel provides v1: "
                                       "update the extension (or Easel)")
    assert "no extension.toml" in by_name["no-manifest"].error
    assert by_name["good"].loaded and by_name["raising"].loaded

    result = run(manager, hooks=exts.hooks(), seed=100)
    # the raising and wrong hooks were skipped; the good one still drew its border on seed 100
    assert result.seeds == [100] and "Broken" not in result.infotexts[0]
    edge, inside = border_and_inside(result.images[0])
    assert (edge == RED).all() and np.array_equal(inside, border_and_inside(plain[100])[1])
    errors = by_name["raising"].hook_errors
    assert any(e.startswith("before_generate: RuntimeError: hook exploded") for e in errors)
    assert any(e.startswith("on_step:") for e in errors) and any(e.startswith("after_image:") for e in errors)
    assert "not a GenerationRequest" in by_name["wrong-return"].hook_errors[0]


def test_listen_without_the_flag_refuses_changes_in_the_ui_handlers(tmp_path):
    import gradio as gr

    from ui import extensions_tab

    folder = write_extension(tmp_path / "src", name="sample")
    anonymous = types.SimpleNamespace(username=None)
    actions = actions_for(tmp_path / "data", tmp_path / "none", listen=True)
    with pytest.raises(gr.Error, match="--enable-insecure-extension-access"):
        extensions_tab.install_handler(actions, str(folder), "", "", anonymous)
    assert not (tmp_path / "data" / "extensions" / "sample").exists()
    assert actions.server_refusal() is not None

    shared = actions_for(tmp_path / "data", tmp_path / "none", share=True, enable_insecure_extension_access=True)
    with pytest.raises(gr.Error, match="--auth"):  # the flag alone is not enough: users must log in
        extensions_tab.install_handler(shared, str(folder), "", "", anonymous)

    allowed = actions_for(tmp_path / "data", tmp_path / "none", listen=True, auth="ann:pw",
                          enable_insecure_extension_access=True)
    assert allowed.server_refusal() is None
    with pytest.raises(gr.Error, match="Log in"):
        extensions_tab.install_handler(allowed, str(folder), "", "", anonymous)
    extensions_tab.install_handler(allowed, str(folder), "", "", types.SimpleNamespace(username="ann"))
    assert (tmp_path / "data" / "extensions" / "sample" / "extension.toml").is_file()
    with pytest.raises(gr.Error, match="--enable-insecure-extension-access"):
        extensions_tab.uninstall_handler(actions, "sample", anonymous)
    assert (tmp_path / "data" / "extensions" / "sample").exists()
    # loopback: allowed without login
    local = actions_for(tmp_path / "data", tmp_path / "none")
    extensions_tab.uninstall_handler(local, "sample", anonymous)
    assert not (tmp_path / "data" / "extensions" / "sample").exists()


# Every ExtensionActions method that changes the server or fetches for the user, with arguments.
CHANGES = {
    "install": lambda a, src: a.install(str(src), "", "", None),
    "install_from_index": lambda a, src: a.install_from_index(str(src / "index.json"), "sample", None),
    "search_index": lambda a, src: a.search_index(str(src / "index.json"), "", None),
    "check_update": lambda a, src: a.check_update("sample", None),
    "update": lambda a, src: a.update("sample", None),
    "disable": lambda a, src: a.set_enabled("sample", False, None),
    "enable": lambda a, src: a.set_enabled("sample", True, None),
    "uninstall": lambda a, src: a.uninstall("sample", None),
    "install_requirements": lambda a, src: a.install_requirements("sample", True, None, run=_never_run),
    "restart": lambda a, src: a.restart(None),
}


def _never_run(*args, **kwargs):
    raise AssertionError("pip must not run on a refused request")


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_listen_without_the_flag_refuses_every_change(tmp_path, change):
    folder = write_extension(tmp_path / "src", name="sample")
    local = actions_for(tmp_path / "data", tmp_path / "none")
    local.install(str(folder), "", "", None)  # something installed for update/disable/uninstall to act on
    before = sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*"))
    state_before = local.state.disabled()
    exposed = actions_for(tmp_path / "data", tmp_path / "none", listen=True)
    with pytest.raises(PermissionError, match="--enable-insecure-extension-access"):
        CHANGES[change](exposed, tmp_path / "src")
    # nothing on disk or in the enabled/disabled state changed
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*")) == before
    assert local.state.disabled() == state_before


def test_rest_routes_list_install_and_refuse_when_exposed(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import api
    from pipelines.access import Authenticator, User
    from pipelines.hashing import HashCache
    from pipelines.registry import ModelRegistry

    def client_for(settings, credentials=()):
        registry = ModelRegistry(settings.paths(), HashCache(settings.cache_file))
        ctx = types.SimpleNamespace(settings=settings, registry=registry, manager=None, jobs=None,
                                    extensions=ExtensionSet([]), restart=None)
        fastapi_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        verify = Authenticator([User(n, p) for n, p in credentials]) if credentials else None
        api.mount(fastapi_app, ctx, verify)
        return TestClient(fastapi_app)

    repo = tmp_path / "repo"
    commit = make_repo(repo)
    installed = tmp_path / "data" / "extensions" / "sample"
    exposed = client_for(Settings(data_dir=tmp_path / "data", listen=True, api=True))
    refused = exposed.post("/sdapi/v1/extensions/install", json={"url": f"file://{repo}"})
    assert refused.status_code == 403 and "--enable-insecure-extension-access" in refused.json()["detail"]
    assert not installed.exists()

    local = client_for(Settings(data_dir=tmp_path / "data", api=True))
    done = local.post("/sdapi/v1/extensions/install", json={"url": f"file://{repo}"})
    assert done.status_code == 200 and "Installed **sample**" in done.json()["message"]
    listed = {e["name"]: e for e in local.get("/sdapi/v1/extensions").json()}
    assert listed["sample"]["commit_hash"] == commit and listed["sample"]["remote"] == f"file://{repo}"
    assert listed["sample"]["enabled"] is True and listed["xyz-plot"]["builtin"] is True
    for action in ("uninstall", "update", "enable", "disable"):
        refused = exposed.post(f"/sdapi/v1/extensions/sample/{action}")
        assert refused.status_code == 403 and "--enable-insecure-extension-access" in refused.json()["detail"], action
    assert installed.exists() and ExtensionState(tmp_path / "data").disabled() == set()

    # exposed with the flag: only a logged-in API user may change extensions
    allowed = client_for(Settings(data_dir=tmp_path / "data", listen=True, api=True, auth="ann:pw",
                                  enable_insecure_extension_access=True), credentials=[("ann", "pw")])
    assert allowed.post("/sdapi/v1/extensions/sample/disable").status_code == 401
    assert allowed.post("/sdapi/v1/extensions/sample/disable", auth=("ann", "pw")).status_code == 200
    assert ExtensionState(tmp_path / "data").disabled() == {"sample"}
    assert local.post("/sdapi/v1/extensions/sample/uninstall").status_code == 200 and not installed.exists()


RECORDER = '''
calls = []


def register(api):
    api.on("before_generate", lambda request: calls.append(("before_generate", request.seed)))
    api.on("on_step", lambda info: calls.append(("on_step", info.step, info.total_steps, info.seeds)))
    api.on("model_loaded", lambda snapshot: calls.append(("model_loaded", snapshot["checkpoint"])))
    api.on("image_saved", lambda path, infotext: calls.append(("image_saved", path.name, "Seed: 5" in infotext)))
'''


def test_step_save_and_load_hooks_see_what_happened(tiny_models_dir, tmp_path):
    import importlib

    from tests.integration.conftest import make_engine

    write_extension(tmp_path / "exts" / "recorder", name="recorder", body=RECORDER)
    exts = load_extensions(tmp_path / "none", tmp_path / "exts")
    calls = importlib.import_module("easel_ext_recorder").calls
    manager, outputs = make_engine(tiny_models_dir, tmp_path / "data")
    result = run(manager, hooks=exts.hooks(), outputs=outputs, seed=5, save_images=True)
    run(manager, hooks=exts.hooks(), seed=6)  # already loaded: no model_loaded this time
    assert calls[:2] == [("before_generate", 5), ("model_loaded", "tinyA.safetensors")]
    assert calls[2:4] == [("on_step", 1, 2, (5,)), ("on_step", 2, 2, (5,))]
    assert calls[4] == ("image_saved", result.paths[0].name, True)
    assert calls[5:] == [("before_generate", 6), ("on_step", 1, 2, (6,)), ("on_step", 2, 2, (6,))]


def test_restart_button_calls_the_launchers_restart_only_when_allowed(tmp_path):
    restarted = []
    s = Settings(data_dir=tmp_path / "data")
    assert "start it again" in ExtensionActions(s, ExtensionSet([]), tmp_path / "none").restart(None)  # no launcher
    actions = ExtensionActions(s, ExtensionSet([]), tmp_path / "none", restart=lambda: restarted.append(1))
    assert actions.restart(None).startswith("Restarting") and restarted == [1]
    exposed = ExtensionActions(Settings(data_dir=tmp_path / "data", listen=True), ExtensionSet([]),
                               tmp_path / "none", restart=lambda: restarted.append(2))
    with pytest.raises(PermissionError):
        exposed.restart(None)
    assert restarted == [1]


SAMPLE_SAMPLER = "Sample DDIM trailing"  # tests/extension_repos.py: DDIM on trailing timesteps


def test_an_extension_sampler_is_listed_accepted_and_runs_and_goes_when_disabled(engine, tmp_path):
    from diffusers import DDIMScheduler

    from api.listings import sampler_list
    from pipelines import samplers

    manager, _ = engine
    write_extension(tmp_path / "exts" / "sample", name="sample")
    exts = load_extensions(tmp_path / "none", tmp_path / "exts")
    additions = exts.additions()
    made = exts.find("sample").registered.samplers[SAMPLE_SAMPLER].__globals__["made_schedulers"]
    assert SAMPLE_SAMPLER in samplers.sampler_names(additions.samplers)
    assert {"name": SAMPLE_SAMPLER, "aliases": [], "options": {"extension": "sample"}} in sampler_list(additions.samplers)

    request = GenerationRequest(**{**BASE, "sampler": SAMPLE_SAMPLER, "seed": 100}, additions=additions)
    result = generate(manager, None, request)
    # the extension's scheduler drove the run: built once, its timesteps set by the pipeline
    assert len(made) == 1 and type(made[0]) is DDIMScheduler
    assert made[0].timesteps.tolist() == [999, 499] and "Sampler: Sample DDIM trailing" in result.infotexts[0]
    builtin_ddim = run(manager, sampler="DDIM", seed=100).images[0]  # leading timesteps 501, 1
    assert np.abs(np.asarray(result.images[0], int) - np.asarray(builtin_ddim, int)).max() > 0
    again = generate(manager, None, request.with_changes(seed=100))
    assert again.images[0].tobytes() == result.images[0].tobytes() and len(made) == 2

    gone = load_extensions(tmp_path / "none", tmp_path / "exts", {"sample"}).additions()
    assert SAMPLE_SAMPLER not in samplers.sampler_names(gone.samplers)
    with pytest.raises(ValueError, match=f"Unknown sampler '{SAMPLE_SAMPLER}'"):
        GenerationRequest(**{**BASE, "sampler": SAMPLE_SAMPLER}, additions=gone)


SAVE_AND_LOAD_RAISE = '''
def register(api):
    def boom(*args):
        raise RuntimeError("io hook exploded")
    api.on("image_saved", boom)
    api.on("model_loaded", boom)
'''
SEED_TAKER = '''
def register(api):
    api.add_infotext_field("Seed", lambda request: 12345)
    api.add_infotext_field("Taker", lambda request: "yes")
'''


def test_raising_save_and_load_hooks_and_a_taken_infotext_key_leave_the_generation_alone(
        tiny_models_dir, tmp_path, caplog):
    from tests.integration.conftest import make_engine

    write_extension(tmp_path / "exts" / "io-raise", name="io-raise", body=SAVE_AND_LOAD_RAISE)
    write_extension(tmp_path / "exts" / "seed-taker", name="seed-taker", body=SEED_TAKER)
    exts = load_extensions(tmp_path / "none", tmp_path / "exts")
    manager, outputs = make_engine(tiny_models_dir, tmp_path / "data")  # fresh: the checkpoint loads
    with caplog.at_level("ERROR", logger="easel.extensions"):
        result = run(manager, hooks=exts.hooks(), outputs=outputs, seed=7, save_images=True)
    assert result.seeds == [7] and len(result.paths) == 1 and result.paths[0].is_file()
    errors = exts.find("io-raise").hook_errors
    assert [e.split(":")[0] for e in errors] == ["model_loaded", "image_saved"]
    assert all("RuntimeError: io hook exploded" in e for e in errors)
    logged = [r.getMessage() for r in caplog.records]
    assert "extension 'io-raise': hook model_loaded failed; going on without it" in logged
    assert "extension 'io-raise': hook image_saved failed; going on without it" in logged

    fields = parse_infotext(result.infotexts[0])
    assert str(fields["Seed"]) == "7" and fields["Taker"] == "yes"  # the engine's seed, not 12345
    assert exts.find("seed-taker").hook_errors == [
        "infotext field Seed: ValueError: infotext key 'Seed' is Easel's own or already used: pick another key"]
    assert "extension 'seed-taker': hook infotext field Seed failed; going on without it" in logged
