"""Styles, wildcards, clip skip and the token counter through the real server (gradio_client):
a styled, wildcarded prompt's infotext round-trips through PNG Info."""
import pytest

from pipelines.metadata import parse_infotext

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = dict(negative_prompt="", sampler="Euler", schedule="Automatic", steps=2, cfg_scale=5, width=64,
            height=64, seed=77, batch_count=1, batch_size=3, checkpoint="tiny.safetensors", vae="Automatic")


def test_styled_wildcard_prompt_round_trips_through_png_info(server, client):
    from gradio_client import handle_file

    (server.data_dir / "styles.csv").write_text(
        'name,prompt,negative_prompt\nCinematic,"cinematic still of {prompt}, film grain","cartoon"\n'
        'Warm,"golden hour",\n', encoding="utf-8")
    (server.data_dir / "wildcards").mkdir(exist_ok=True)
    (server.data_dir / "wildcards" / "colour.txt").write_text("red\nblue\ngreen\nyellow\n")
    _gallery, info = client.predict(**BASE, prompt="a __colour__ {lighthouse|tower}", styles=["Cinematic", "Warm"],
                                    clip_skip=2, wildcard_mode="combinatorial", api_name="/txt2img")
    resolved = []
    for path, infotext in zip(info["paths"], info["infotexts"]):
        written = parse_infotext(infotext)
        assert written["Prompt"].startswith("cinematic still of a ") and written["Prompt"].endswith(", golden hour")
        assert written["Negative prompt"] == "cartoon" and written["Clip skip"] == "2"
        text, parsed = client.predict(image=handle_file(path), api_name="/png_info")
        assert text == infotext
        assert parsed["Styles array"] == ["Cinematic", "Warm"]
        assert parsed["Negative prompt"] == ""
        resolved.append(parsed["Prompt"])
    # combinatorial: the batch walks the combinations in order (dynamicprompts sorts wildcard lines)
    assert resolved == ["a blue lighthouse", "a blue tower", "a green lighthouse"]
