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
