"""Login users, hashed passwords, admins, and the launch rules for --share / --listen."""
import pytest

import app
from pipelines import access
from pipelines.settings import Settings


def test_hashed_and_plain_passwords_and_admins_from_the_auth_file(tmp_path):
    hashed = access.hash_password("s3cret", iterations=1000)
    assert hashed.startswith("pbkdf2_sha256$1000$") and "s3cret" not in hashed
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"# team\n@alice:{hashed}\nbob:plain:with:colons, carol:pw\n")
    users = access.load_users("dave:pw4", users_file)
    assert [(u.name, u.admin) for u in users] == [("dave", False), ("alice", True), ("bob", False),
                                                  ("carol", False)]
    auth = access.Authenticator(users)
    assert auth("alice", "s3cret") and not auth("alice", hashed) and not auth("alice", "S3cret")
    assert auth("bob", "plain:with:colons") and auth("dave", "pw4")
    assert not auth("nobody", "pw4") and not auth("carol", "")
    assert auth.is_admin("alice") and not auth.is_admin("bob") and not auth.is_admin(None)
    assert auth.admins == ["alice"]
    assert access.login_summary(users) == "users who may log in: dave, alice (admin), bob, carol"


@pytest.mark.parametrize("text, message", [
    ("alice\n", "user:password"),
    (":pw\n", "user:password"),
    ("alice:pw\nalice:pw2\n", "listed twice"),
])
def test_bad_auth_files_are_refused_with_the_reason(tmp_path, text, message):
    users_file = tmp_path / "users.txt"
    users_file.write_text(text)
    with pytest.raises(ValueError, match=message):
        access.load_users(None, users_file)
    with pytest.raises(ValueError, match="cannot read --auth-file"):
        access.load_users(None, tmp_path / "missing.txt")


def test_a_corrupt_hash_never_logs_in():
    for stored in ("pbkdf2_sha256$x$salt$abc", "pbkdf2_sha256$0$s$abc", "md5$1$s$abc"):
        assert not access.verify_password("anything", stored)


def test_share_needs_a_login_and_listen_without_one_warns_and_locks_extensions(tmp_path):
    users = access.load_users("u:p", None)
    with pytest.raises(ValueError, match="--auth user:password"):
        access.check_launch(Settings(data_dir=tmp_path, share=True), [])
    assert access.check_launch(Settings(data_dir=tmp_path, share=True), users).warnings == ()
    listen = Settings(data_dir=tmp_path, listen=True)
    assert "ANYONE on your network" in access.check_launch(listen, []).warnings[0]
    assert listen.remote_access and not listen.extension_install_allowed
    assert Settings(data_dir=tmp_path).extension_install_allowed
    assert Settings(data_dir=tmp_path, share=True, auth="u:p", enable_insecure_extension_access=True) \
        .extension_install_allowed


def test_launch_report_says_where_who_and_that_the_tunnel_failed(tmp_path):
    users = access.load_users("@root:p,guest:q", None)
    shared = Settings(data_dir=tmp_path, share=True, auth="@root:p,guest:q")
    lines = access.launch_report(shared, users, "http://127.0.0.1:7860/", None)
    assert lines[0] == "Easel is running at http://127.0.0.1:7860/"
    assert lines[1] == "users who may log in: root (admin), guest"
    assert any("share tunnel could not be opened" in line and "locally" in line for line in lines)
    ok = access.launch_report(shared, users, "http://127.0.0.1:7860/", "https://abc.gradio.live")
    # Gradio's share server expires links after 72 h (shared/reference/security-anchors.md 1.3)
    (link,) = [line for line in ok if "https://abc.gradio.live" in line]
    assert "expires it after 72 hours" in link and "week" not in link


def test_main_refuses_share_without_auth_before_building_anything(tmp_path, capsys):
    assert app.main(["--data-dir", str(tmp_path), "--share"]) == 2
    err = capsys.readouterr().err
    assert "--share" in err and "--auth user:password" in err and "--auth-file" in err
    assert not (tmp_path / "outputs").exists()


def test_hash_command_reads_stdin_and_prints_a_usable_hash(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert access._main(["hash"]) == 0
    assert access.verify_password("pw", capsys.readouterr().out.strip())


def test_with_logins_only_admins_change_shared_state_and_cancel_all(tmp_path):
    auth = access.Authenticator(access.load_users("@root:p,guest:q", None))
    assert access.shared_change_refusal(auth, "root", "unload the checkpoint") is None
    refusal = access.shared_change_refusal(auth, "guest", "unload the checkpoint")
    assert refusal == ("only admins (marked @name in the auth file) can unload the checkpoint: "
                       "it changes the server for every user")
    assert access.shared_change_refusal(auth, None, "x") is not None
    assert access.shared_change_refusal(None, None, "x") is None  # no logins: the one local user may
    assert access.cancel_all_refusal(auth, "root") is None
    assert "cancel other users' jobs" in access.cancel_all_refusal(auth, "guest")
    assert access.cancel_all_refusal(None, None) is not None  # nobody is an admin without logins


def test_served_paths_allow_the_outputs_only_and_block_the_private_files(tmp_path):
    settings = Settings(data_dir=tmp_path, auth_file=tmp_path / "users.txt")
    allowed, blocked = access.served_paths(settings)
    assert allowed == [str((tmp_path / "outputs").resolve())]
    for private in ("models", "embeddings", "config.json", "cache.json", "extensions", "history.json", "users.txt"):
        assert str((tmp_path / private).resolve()) in blocked


# --- REST: with logins, what everyone shares is for admins -------------------------------------

from tests.unit.test_api import ctx  # noqa: E402,F401 - the REST tests' registry and fake engine (a fixture)

def _rest(ctx, logins):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import api

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    api.mount(app, ctx, access.Authenticator(access.load_users(logins, None)) if logins else None)
    return TestClient(app)


def test_rest_options_load_and_unload_are_admin_only_when_there_are_logins(ctx):
    client = _rest(ctx, "@root:rp,guest:gp")
    guest, root = ("guest", "gp"), ("root", "rp")
    options = client.get("/sdapi/v1/options", auth=guest).json()
    assert client.post("/sdapi/v1/options", json=options, auth=guest).status_code == 200  # no change: fine
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/other.safetensors"}, auth=guest)
    assert refused.status_code == 403
    assert refused.json()["detail"] == ("only admins (marked @name in the auth file) can change the API's default "
                                        "checkpoint, VAE or clip skip: it changes the server for every user")
    for path in ("/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"):
        assert client.post(path, auth=guest).status_code == 403
    assert ctx.manager.loads == [] and ctx.manager.unloads == 0
    assert client.get("/sdapi/v1/options", auth=guest).json() == options

    # A guest's override_settings apply to their request only, even when asked to keep them.
    body = {"width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "sub/other.safetensors"},
            "override_settings_restore_afterwards": False}
    assert client.post("/sdapi/v1/txt2img", json=body, auth=guest).status_code == 200
    assert ctx.jobs.submitted[-1] == ("user:guest", ctx.jobs.submitted[-1][1])
    assert ctx.jobs.submitted[-1][1].checkpoint == "sub/other.safetensors"
    assert client.get("/sdapi/v1/options", auth=guest).json()["sd_model_checkpoint"] == "sd15.safetensors"

    # The admin may do all of it.
    assert client.post("/sdapi/v1/txt2img", json=body, auth=root).status_code == 200
    assert client.get("/sdapi/v1/options", auth=root).json()["sd_model_checkpoint"] == "sub/other.safetensors"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd15"}, auth=root).status_code == 200
    assert client.post("/sdapi/v1/unload-checkpoint", auth=root).status_code == 200 and ctx.manager.unloads == 1
    assert client.post("/sdapi/v1/reload-checkpoint", auth=root).status_code == 200
    assert ctx.manager.loads == [("sd15.safetensors", "Automatic")] * 2

    # Without logins there is one local user, who may (A1111's behaviour).
    open_client = _rest(ctx, None)
    assert open_client.post("/sdapi/v1/unload-checkpoint").status_code == 200 and ctx.manager.unloads == 2


def test_rest_cancel_all_is_for_admins_and_history_lists_ones_own_images(ctx, tmp_path):
    from datetime import date

    from PIL import Image

    from pipelines.history import HistoryIndex
    from pipelines.outputs import OutputStore

    cancelled = []
    ctx.jobs.cancel_all = lambda: cancelled.append("all") or 3
    outputs = tmp_path / "data" / "outputs"
    ctx.outputs = OutputStore(outputs, today=lambda: date(2024, 7, 27),
                              history=HistoryIndex(tmp_path / "data" / "history.json", outputs))
    made = {owner: ctx.outputs.save(Image.new("RGB", (8, 8)), category="txt2img-images", seed=seed,
                                    infotext=f"{owner} picture\nSteps: 1, Seed: {seed}, Size: 8x8", owner=owner)
            for seed, owner in enumerate(("user:guest", "user:root", "session:x"))}
    client = _rest(ctx, "@root:rp,guest:gp")
    refused = client.post("/sdapi/v1/cancel-all", auth=("guest", "gp"))
    assert refused.status_code == 403 and "cancel other users' jobs" in refused.json()["detail"] and not cancelled
    assert client.post("/sdapi/v1/cancel-all", auth=("root", "rp")).json() == {"cancelled": 3}
    assert _rest(ctx, None).post("/sdapi/v1/cancel-all").status_code == 403  # no logins: no admins
    (mine,) = client.get("/sdapi/v1/history", auth=("guest", "gp")).json()["entries"]
    assert mine["file"] == str(made["user:guest"]) and mine["prompt"] == "user:guest picture"
    assert mine["owner"] == "user:guest" and mine["params"]["Seed"] == "0"
    everyone = _rest(ctx, None).get("/sdapi/v1/history").json()["entries"]
    assert sorted(e["file"] for e in everyone) == sorted(str(p) for p in made.values())
