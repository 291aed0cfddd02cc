"""The extension framework's rules without models: manifests, the API object, the access rule,
safe zips, and an index read over HTTP."""
import http.server
import json
import threading
import zipfile
from functools import partial

import pytest

from extensions.access import extension_access_refusal, server_refusal
from extensions.api import ExtensionAPI
from extensions.index import read_index, search_index
from extensions.installer import Installer
from extensions.manifest import manifest_from_dict
from pipelines.settings import Settings

GOOD = {"name": "border", "version": "1.0", "api_version": 1}


def test_manifest_fields_are_checked_with_a_message():
    assert manifest_from_dict(GOOD | {"requirements": ["numpy>=1", " "]}).requirements == ("numpy>=1",)
    for bad, message in [({"name": "Bad Name"}, "name must be lower-case"),
                         ({"api_version": "1"}, "api_version must be an integer"),
                         ({"requirements": "numpy"}, "requirements must be a list"),
                         ({"homepage": 3}, "homepage must be a string")]:
        with pytest.raises(ValueError, match=message):
            manifest_from_dict(GOOD | bad)
    with pytest.raises(ValueError, match="missing version, api_version"):
        manifest_from_dict({"name": "x"})


def test_the_api_object_validates_and_closes_after_register():
    api = ExtensionAPI("border", {"colour": "blue"})
    with pytest.raises(ValueError, match="unknown hook 'after_everything'"):
        api.on("after_everything", print)
    with pytest.raises(ValueError, match="accordions go in one of txt2img, img2img"):
        api.add_accordion("settings", "x", print)
    with pytest.raises(ValueError, match="route path"):
        api.add_route("../../sdapi/v1/txt2img", print)
    with pytest.raises(ValueError, match="infotext key"):
        api.add_infotext_field("Bad: key", print)
    assert api.add_route("/items/{item}/", print, methods=("get", "POST")) == "/ext/border/items/{item}"
    api.declare_setting("colour", "red")
    api.declare_setting("width", 2)
    assert (api.setting("colour"), api.setting("width")) == ("blue", 2)
    with pytest.raises(KeyError, match="has not declared setting 'other'"):
        api.setting("other")
    decorated = api.on("after_image")(lambda image, request: image)
    assert api.registered.hooks["after_image"] == [decorated]
    api.close()
    with pytest.raises(RuntimeError, match="inside register"):
        api.on("on_step", print)


@pytest.mark.parametrize("flags, user, allowed, says", [
    ({}, None, True, ""),
    ({"listen": True}, "ann", False, "--enable-insecure-extension-access"),
    ({"share": True, "auth": "ann:pw"}, "ann", False, "--share"),
    ({"listen": True, "enable_insecure_extension_access": True}, None, False, "--auth"),
    ({"listen": True, "enable_insecure_extension_access": True, "auth": "ann:pw"}, None, False, "Log in"),
    ({"listen": True, "enable_insecure_extension_access": True, "auth": "ann:pw"}, "ann", True, ""),
])
def test_access_rule(tmp_path, flags, user, allowed, says):
    settings = Settings(data_dir=tmp_path, **flags)
    reason = extension_access_refusal(settings, user)
    assert (reason is None) == allowed and says in (reason or "")
    if flags.get("auth") and flags.get("enable_insecure_extension_access"):
        assert server_refusal(settings) is None  # buttons enabled; the handler checks the user


def test_zips_with_unsafe_paths_are_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("extension.toml", 'name = "evil"\nversion = "1"\napi_version = 1\n')
        zf.writestr("../outside.txt", "escaped")
    with pytest.raises(ValueError, match="unsafe path"):
        Installer(tmp_path / "exts").install(str(archive))
    assert not (tmp_path / "outside.txt").exists()
    assert [p.name for p in (tmp_path / "exts").iterdir()] == []  # no staging folder left behind


def test_bad_refs_and_builtin_names_are_refused(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "extension.toml").write_text('name = "xyz-plot"\nversion = "1"\napi_version = 1\n')
    installer = Installer(tmp_path / "exts", builtin_names=["xyz-plot"])
    with pytest.raises(ValueError, match="branch '--upload-pack=x' is not a valid git reference"):
        installer.install("file:///nowhere", branch="--upload-pack=x")
    with pytest.raises(ValueError, match="name of a built-in extension"):
        installer.install(str(folder))
    with pytest.raises(ValueError, match="built in: it updates with Easel"):
        installer.uninstall("xyz-plot")


def test_index_from_a_url_is_searched(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"extensions": [
        {"name": "border", "url": "https://example.invalid/border.git", "description": "Frames", "tags": ["image"]},
        {"name": "no-url"},
        {"url": "https://example.invalid/named-by-url"}]}))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        entries = read_index(f"http://127.0.0.1:{server.server_address[1]}/index.json")
    finally:
        server.shutdown()
        server.server_close()
    assert [e.name for e in entries] == ["border", "named-by-url"]
    assert [e.name for e in search_index(entries, "IMAGE frames")] == ["border"]
    assert search_index(entries, "") == entries


# --- what extensions add to the engine: samplers and preprocessors ------------------------------

def _load(tmp_path, body_by_name, disabled=frozenset()):
    from extensions.loader import load_extensions
    from tests.extension_repos import write_extension

    for name, body in body_by_name.items():
        write_extension(tmp_path / "exts" / name, name=name, body=body)
    return load_extensions(tmp_path / "none", tmp_path / "exts", set(disabled))


SAMPLERS = '''
def register(api):
    from diffusers import EulerDiscreteScheduler

    api.add_sampler("Euler trailing", lambda config: EulerDiscreteScheduler.from_config(
        {**config, "timestep_spacing": "trailing"}))
    api.add_sampler("Not a scheduler", lambda config: "nope")
'''


def test_extension_samplers_are_offered_validated_and_built(tmp_path):
    from diffusers import EulerDiscreteScheduler

    from pipelines import samplers
    from pipelines.request import GenerationRequest

    # loaded in name order: "trailing" first, "twice" second adds the same name again
    exts = _load(tmp_path, {"trailing": SAMPLERS, "twice": SAMPLERS.replace("Not a scheduler", "Other")})
    table = exts.additions().samplers
    assert samplers.sampler_names(table)[-3:] == ["Euler trailing", "Not a scheduler", "Other"]
    assert exts.find("twice").hook_errors == [
        "sampler 'Euler trailing': ValueError: another extension added it first; this one is left out"]
    exts.additions()
    assert len(exts.find("twice").hook_errors) == 1  # reported once however often the tables are built
    assert samplers.schedules_for("euler TRAILING", table) == ["Automatic"]

    request = GenerationRequest(sampler="euler trailing", additions=exts.additions())
    assert (request.sampler, request.schedule) == ("Euler trailing", "Automatic")
    assert "additions" not in request.to_dict()
    assert request.with_changes(steps=3).additions.samplers.names() == table.names()
    with pytest.raises(ValueError, match="Unknown sampler 'Euler trailing'"):  # Easel alone does not know it
        GenerationRequest(sampler="Euler trailing")
    with pytest.raises(ValueError, match="sets its own schedule"):
        GenerationRequest(sampler="Euler trailing", schedule="Karras", additions=exts.additions())

    # the checkpoint's model keys only: a previous request's sigma settings never leak in
    base = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "use_karras_sigmas": True}
    scheduler = samplers.make_scheduler("Euler trailing", "Automatic", base, table=table)
    assert type(scheduler) is EulerDiscreteScheduler
    assert (scheduler.config.timestep_spacing, scheduler.config.use_karras_sigmas) == ("trailing", False)
    with pytest.raises(ValueError, match="'Not a scheduler' \\(extension 'trailing'\\) returned str"):
        samplers.make_scheduler("Not a scheduler", None, base, table=table)

    assert _load(tmp_path, {}, disabled={"trailing", "twice"}).additions().samplers.names() == []
    api = ExtensionAPI("clash")
    for taken in ("Euler a", "k_euler", "DPM++ 2M Karras"):
        with pytest.raises(ValueError, match="already Easel's"):
            api.add_sampler(taken, print)


def test_extension_preprocessor_in_lookup_and_detect(tmp_path):
    import numpy as np
    from PIL import Image

    from pipelines.control import preprocessors

    exts = _load(tmp_path, {"inv": (
        "from PIL import ImageOps\n\n"
        "def register(api):\n"
        "    api.add_preprocessor('My-Invert', lambda image: ImageOps.invert(image))\n"
        "    api.add_preprocessor('halves', lambda image: __import__('numpy').zeros((4, 4)))\n")})
    table = exts.additions().preprocessors
    assert preprocessors.names(table)[-2:] == ["my-invert", "halves"]
    assert preprocessors.get("My-Invert", table).source == "inv"
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'my-invert'"):
        preprocessors.get("my-invert")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    detected = preprocessors.detect("my-invert", Image.fromarray(pixels), resolution=-1, table=table)
    assert np.array_equal(np.asarray(detected), 255 - pixels)
    assert np.asarray(preprocessors.detect("my-invert", Image.fromarray(pixels), resolution=24, table=table)).shape \
        == (24, 32, 3)  # at the requested resolution, like Easel's own
    with pytest.raises(ValueError, match="'halves' \\(extension 'inv'\\) returned ndarray \\(4, 4\\)"):
        preprocessors.detect("halves", Image.fromarray(pixels), table=table)
    with pytest.raises(ValueError, match="already Easel's"):
        ExtensionAPI("clash").add_preprocessor("Canny", print)


# --- README, installer, requirements -----------------------------------------------------------

def _readme_blocks(language: str) -> dict[str, str]:
    """The README's fenced code blocks of `language`, by the section title above them."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "extensions" / "README.md").read_text()
    blocks, section = {}, ""
    for match in re.finditer(rf"^## ([^\n]+)$|^```{language}\n(.*?)^```", text, re.M | re.S):
        if match[1]:
            section = match[1].strip()
        else:
            blocks.setdefault(section, match[2])
    return blocks


def test_the_readme_minimal_example_loads_and_draws_its_border(tmp_path):
    import numpy as np
    from PIL import Image

    from extensions.loader import load_extensions
    from pipelines.request import GenerationRequest

    folder = tmp_path / "exts" / "border"
    folder.mkdir(parents=True)
    (folder / "extension.toml").write_text(_readme_blocks("toml")["extension.toml"])
    (folder / "__init__.py").write_text(_readme_blocks("python")["Minimal example"])
    exts = load_extensions(tmp_path / "none", tmp_path / "exts", setting_values={"border": {"colour": "blue"}})
    record = exts.find("border")
    assert record.loaded, record.error
    hooks = exts.hooks()
    request = GenerationRequest(width=64, height=64)
    image = hooks.after_image(Image.new("RGB", (32, 32), "white"), request)
    pixels = np.asarray(image)
    assert (pixels[0] == (0, 0, 255)).all() and (pixels[:, -1] == (0, 0, 255)).all()
    assert (pixels[2:-2, 2:-2] == 255).all()  # only the 2-pixel frame
    assert hooks.extend_infotext(request, {"Steps": 20}) == {"Steps": 20, "Border": "blue"}
    assert record.hook_errors == []


def test_branch_or_commit_for_a_zip_or_plain_folder_is_refused(tmp_path):
    import shutil

    from tests.extension_repos import write_extension

    folder = write_extension(tmp_path / "src" / "plain", name="plain")
    archive = shutil.make_archive(str(tmp_path / "plain"), "zip", root_dir=tmp_path / "src")
    installer = Installer(tmp_path / "exts")
    with pytest.raises(ValueError, match="is a folder that is not a git repository: a branch or commit "
                                         "applies to git sources only"):
        installer.install(str(folder), branch="main")
    with pytest.raises(ValueError, match="is a .zip file: a branch or commit applies to git sources only"):
        installer.install(archive, commit="abc123")
    assert sorted(p.name for p in (tmp_path / "exts").iterdir()) == []
    assert installer.install(archive).name == "plain"  # without them it installs


def test_installing_an_extension_for_another_api_version_warns(tmp_path):
    from extensions.actions import ExtensionActions
    from extensions.loader import ExtensionSet
    from tests.extension_repos import write_extension

    from types import SimpleNamespace

    from ui.extensions_tab import install_handler

    actions = ExtensionActions(Settings(data_dir=tmp_path / "data"), ExtensionSet([]), tmp_path / "none")
    # what the tab's Install button shows in its message area
    message = install_handler(actions, str(write_extension(tmp_path / "old", name="old", api_version=0)), "", "",
                              SimpleNamespace(username=None))
    assert ("**Warning:** extension 'old' needs extension API v0, Easel provides v1: update the extension "
            "(or Easel). It stays installed but will not load.") in message
    current = actions.install(str(write_extension(tmp_path / "new", name="new")), "", "", None)
    assert "Warning" not in current


def test_requirements_text_shows_declared_ones_and_marks_missing(tmp_path):
    from extensions.actions import ExtensionActions
    from extensions.loader import ExtensionSet
    from tests.extension_repos import write_extension
    from ui.extensions_tab import requirements_text

    actions = ExtensionActions(Settings(data_dir=tmp_path / "data"), ExtensionSet([]), tmp_path / "none")
    actions.install(str(write_extension(tmp_path / "needs", name="needs")), "", "", None)
    none = write_extension(tmp_path / "bare", name="bare")
    (none / "extension.toml").write_text('name = "bare"\nversion = "1"\napi_version = 1\n')
    actions.install(str(none), "", "", None)
    assert requirements_text(actions, "needs").splitlines() == [
        "packaging>=20", "easel-surely-not-installed-pkg==0.0.1   <- missing"]
    assert requirements_text(actions, "bare") == "(none declared)"
    assert requirements_text(actions, "ghost") == "no extension named 'ghost'"
    assert requirements_text(actions, "") == ""
