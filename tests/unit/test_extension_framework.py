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
