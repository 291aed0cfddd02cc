"""Settings precedence (defaults < data/config.json < EASEL_* environment < command line) and
per-key validation."""
import json
from pathlib import Path

import pytest

from pipelines.settings import Settings


def write_config(data_dir: Path, values) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.json").write_text(json.dumps(values), encoding="utf-8")


def test_defaults_when_nothing_is_given(tmp_path):
    s = Settings.from_sources(["--data-dir", str(tmp_path)], environ={})
    assert (s.port, s.listen, s.share, s.api, s.online) == (7860, False, False, False, False)
    assert (s.device, s.precision, s.ram_cache_gb, s.auth) == ("auto", "auto", 4.0, None)
    assert s.data_dir == tmp_path
    assert s.models_root == tmp_path / "models"
    assert s.embeddings_root == tmp_path / "embeddings"
    assert s.outputs_dir == tmp_path / "outputs"
    assert s.cache_file == tmp_path / "cache.json"


@pytest.mark.parametrize("config, env, cli, expected", [
    ({}, {}, [], 7860),
    ({"port": 7000}, {}, [], 7000),
    ({"port": 7000}, {"EASEL_PORT": "7100"}, [], 7100),
    ({"port": 7000}, {"EASEL_PORT": "7100"}, ["--port", "7200"], 7200),
    ({}, {}, ["--port", "7200"], 7200),
])
def test_each_source_overrides_the_one_before(tmp_path, config, env, cli, expected):
    write_config(tmp_path, config)
    s = Settings.from_sources(["--data-dir", str(tmp_path), *cli], environ=env)
    assert s.port == expected


def test_precedence_is_per_key(tmp_path):
    write_config(tmp_path, {"precision": "fp16", "ram_cache_gb": 2, "device": "cpu"})
    env = {"EASEL_PRECISION": "bf16"}
    s = Settings.from_sources(["--data-dir", str(tmp_path), "--ram-cache-gb", "1.5"], environ=env)
    assert (s.device, s.precision, s.ram_cache_gb) == ("cpu", "bf16", 1.5)


def test_boolean_flags_from_every_source(tmp_path):
    write_config(tmp_path, {"listen": True, "share": "false"})
    s = Settings.from_sources(["--data-dir", str(tmp_path), "--api"], environ={"EASEL_ONLINE": "1"})
    assert (s.listen, s.share, s.api, s.online) == (True, False, True, True)
    # A flag not given on the command line does not reset what config.json said.
    assert Settings.from_sources(["--data-dir", str(tmp_path)], environ={}).listen is True


def test_data_dir_from_environment_reads_its_config(tmp_path):
    write_config(tmp_path / "env-data", {"port": 7300})
    s = Settings.from_sources([], environ={"EASEL_DATA_DIR": str(tmp_path / "env-data")})
    assert (s.data_dir, s.port) == (tmp_path / "env-data", 7300)
    # The command line beats the environment for the data dir too.
    s = Settings.from_sources(["--data-dir", str(tmp_path / "cli-data")],
                              environ={"EASEL_DATA_DIR": str(tmp_path / "env-data")})
    assert (s.data_dir, s.port) == (tmp_path / "cli-data", 7860)


def test_a1111_folders_and_auth_flags(tmp_path):
    a1111 = tmp_path / "stable-diffusion-webui"
    s = Settings.from_sources(["--data-dir", str(tmp_path / "data"), "--models-dir", str(a1111 / "models"),
                               "--embeddings-dir", str(a1111 / "embeddings"), "--auth", "me:secret,you:pw",
                               "--auth-file", str(tmp_path / "users.txt")], environ={})
    assert s.models_root == a1111 / "models"
    assert s.embeddings_root == a1111 / "embeddings"
    assert s.outputs_dir == tmp_path / "data" / "outputs"  # outputs stay in our data dir
    assert s.auth == "me:secret,you:pw"
    assert s.auth_file == tmp_path / "users.txt"


def test_config_json_may_hold_ui_options_that_are_not_startup_settings(tmp_path):
    write_config(tmp_path, {"sd_model_checkpoint": "v1-5.safetensors", "port": 7001})
    assert Settings.from_sources(["--data-dir", str(tmp_path)], environ={}).port == 7001


@pytest.mark.parametrize("config, env, cli, message", [
    ({"device": "tpu"}, {}, [], "device 'tpu' is not one of"),
    ({"precision": "fp8"}, {}, [], "precision 'fp8'"),
    ({"ram_cache_gb": "lots"}, {}, [], "setting 'ram_cache_gb': cannot read 'lots'"),
    ({}, {"EASEL_PORT": "seventy"}, [], "setting 'port': cannot read 'seventy'"),
    ({}, {}, ["--port", "70000"], "port must be between 1 and 65535"),
    ({}, {}, ["--ram-cache-gb", "-1"], "ram_cache_gb must be between"),
    ({}, {}, ["--auth", "nopassword"], "auth must look like user:password"),
])
def test_bad_values_name_the_key(tmp_path, config, env, cli, message):
    write_config(tmp_path, config)
    with pytest.raises(ValueError, match=message):
        Settings.from_sources(["--data-dir", str(tmp_path), *cli], environ=env)


def test_broken_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        Settings.from_sources(["--data-dir", str(tmp_path)], environ={})


def test_unknown_cli_choice_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        Settings.from_sources(["--data-dir", str(tmp_path), "--device", "tpu"], environ={})
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_with_overrides_validates_and_coerces(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert s.with_overrides(port="7500").port == 7500
    with pytest.raises(ValueError, match="device"):
        s.with_overrides(device="gpu")


def test_fast_mode_flags_reach_settings(tmp_path):
    from pipelines.settings import Settings
    settings = Settings.from_sources(["--data-dir", str(tmp_path), "--fast"], environ={})
    assert settings.fast and not settings.fast_compile
    settings = Settings.from_sources(["--data-dir", str(tmp_path)], environ={"EASEL_FAST_COMPILE": "1"})
    assert settings.fast_compile and not settings.fast


def test_memory_mode_flags_build_memory_options(tmp_path):
    import app
    from pipelines.settings import Settings
    settings = Settings.from_sources(["--data-dir", str(tmp_path), "--medvram", "--vae-tile-above-pixels", "0"],
                                     environ={})
    options = app.memory_options(settings)
    assert options.mode == "medvram" and options.vae_tile_above_pixels == 0
    assert app.memory_options(Settings.from_sources(["--data-dir", str(tmp_path), "--lowvram", "--medvram"],
                                                    environ={})).mode == "lowvram"
