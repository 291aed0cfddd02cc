import io
import json
from pathlib import Path

import piexif
import pytest
from PIL import Image, PngImagePlugin

from pipelines.metadata import (
    decode_user_comment,
    format_infotext,
    image_bytes_with_infotext,
    parse_infotext,
    parse_infotext_typed,
    read_infotext,
    read_other_metadata,
    split_infotext,
    split_sampler_name,
)

INFOTEXTS = Path(__file__).resolve().parents[1] / "data" / "infotexts"

FULL_PARAMS_LINE = (
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.5, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
    'Lora hashes: "add_detail: 7c6bad76eb54, foo: 0123456789ab", '
    'TI hashes: "easynegative: c74b4e810b03", Emphasis: No norm, Version: v1.10.1'
)


def _full_params():
    return {
        "Steps": 20,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7,
        "Seed": 1234567890,
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "VAE hash": "735e4c3a44",
        "VAE": "vae-ft-mse-840000-ema-pruned.safetensors",
        "Variation seed": None,
        "Denoising strength": 0.5,
        "Clip skip": 2,
        "Hires upscale": 2,
        "Hires steps": 10,
        "Hires upscaler": "Latent",
        "Lora hashes": "add_detail: 7c6bad76eb54, foo: 0123456789ab",
        "TI hashes": "easynegative: c74b4e810b03",
        "Emphasis": "No norm",
        "Version": "v1.10.1",
    }


def _load(name):
    return (INFOTEXTS / name).read_text(encoding="utf-8").strip()


# ------------------------------------------------------------------ format


def test_full_example_exact_text():
    text = format_infotext(
        "a castle on a hill, sunset",
        "blurry, lowres",
        _full_params(),
    )
    assert text == (
        "a castle on a hill, sunset\n"
        "Negative prompt: blurry, lowres\n"
        + FULL_PARAMS_LINE
    )


def test_full_example_parses_back():
    text = format_infotext("a castle on a hill, sunset", "blurry, lowres", _full_params())
    res = parse_infotext(text)
    assert res["Prompt"] == "a castle on a hill, sunset"
    assert res["Negative prompt"] == "blurry, lowres"
    assert res["Steps"] == "20"
    assert res["Sampler"] == "DPM++ 2M"
    assert res["Schedule type"] == "Karras"
    assert res["CFG scale"] == "7"
    assert res["Seed"] == "1234567890"
    assert (res["Size-1"], res["Size-2"]) == ("512", "768")
    assert "Size" not in res
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54, foo: 0123456789ab"
    assert res["TI hashes"] == "easynegative: c74b4e810b03"
    assert res["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert res["Clip skip"] == "2"
    assert res["Emphasis"] == "No norm"
    assert res["Version"] == "v1.10.1"
    assert "Variation seed" not in res  # None was dropped when writing


def test_no_negative_prompt_omits_the_line_and_strips():
    text = format_infotext("  a cat  ", "", {"Steps": 5, "Sampler": "Euler", "Seed": 1})
    assert text == "a cat  \nSteps: 5, Sampler: Euler, Seed: 1"
    assert "Negative prompt" not in text


def test_quoting_rules():
    text = format_infotext(
        "p",
        "",
        {
            "Steps": 1,
            "Plain": 'say "hi"',  # quotes alone do not trigger quoting
            "Comma": "a, b",
            "Colon": "a: b",
            "Newline": "a\nb",
            "Unicode": "猫, 犬",
            "Flag": "Flag",
            "Tiling": True,
            "Dropped": None,
        },
    )
    assert text == (
        'p\nSteps: 1, Plain: say "hi", Comma: "a, b", Colon: "a: b", Newline: "a\\nb", '
        'Unicode: "猫, 犬", Flag, Tiling: True'
    )


def test_dict_value_is_written_as_json_like_a1111():
    text = format_infotext("p", "", {"Steps": 1, "Seed": 2, "Hashes": {"model": "abc", "lora:x": "def"}})
    assert text.endswith('Hashes: {"model": "abc", "lora:x": "def"}')


@pytest.mark.parametrize("key", ["a,b", "a:b", "a\nb", ""])
def test_bad_keys_are_rejected(key):
    with pytest.raises(ValueError, match="infotext key"):
        format_infotext("p", "", {"Steps": 1, key: "v"})


# ------------------------------------------------------------------ parse


@pytest.mark.parametrize("name", sorted(p.name for p in INFOTEXTS.glob("*.txt")))
def test_real_infotexts_round_trip_exactly(name):
    text = _load(name)
    assert format_infotext(*split_infotext(text)) == text


def test_real_infotext_fixture_set_covers_the_required_shapes():
    texts = {p.name: _load(p.name) for p in INFOTEXTS.glob("*.txt")}
    assert len(texts) >= 5
    assert any(len(split_infotext(t)[0].splitlines()) > 1 for t in texts.values())  # multi-line prompt
    assert any(split_infotext(t)[1] == "" and split_infotext(t)[2] for t in texts.values())  # no negative
    assert any('\\"' in t for t in texts.values())  # escaped quotes inside a quoted value
    assert any("Sampler: DPM++ 2M Karras" in t for t in texts.values())
    assert any("Hashes: {" in t for t in texts.values())
    assert any(any(ord(c) > 0x3000 for c in t) for t in texts.values())


def test_multiline_prompt_and_negative():
    res = parse_infotext(_load("a1111_v1_10_hires_lora.txt"))
    assert res["Prompt"] == (
        "masterpiece, best quality, (1girl:1.2), solo, long hair, looking at viewer,\n"
        "cherry blossoms, spring, <lora:add_detail:0.6>, BREAK\n"
        "soft lighting, depth of field, easynegative"
    )
    assert res["Negative prompt"] == (
        "(worst quality, low quality:1.4), lowres, bad anatomy,\n"
        "bad hands, text, error, missing fingers, easynegative"
    )
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert res["ADetailer inpaint only masked"] == "True"
    assert res["Emphasis"] == "No norm"  # present, so no default


def test_escaped_quotes_and_newlines_are_unquoted():
    res = parse_infotext(_load("quoted_escapes.txt"))
    assert res["Hires prompt"] == 'portrait of an old sailor, "weathered" face, rain, sharp focus'
    assert res["ADetailer prompt"] == "detailed eyes,\nwrinkles \\ scars"
    assert res["ControlNet 0"].startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1")
    assert res["Prompt"] == 'portrait of an old sailor, "weathered" face, rain'


def test_legacy_sampler_name_is_split():
    res = parse_infotext(_load("legacy_sampler_v1_5.txt"))
    assert res["Sampler"] == "DPM++ 2M"
    assert res["Schedule type"] == "Karras"
    assert res["ENSD"] == "31337"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "Karras")),
        ("Euler SGM Uniform", ("Euler", "SGM Uniform")),
        ("Euler Uniform", ("Euler", "Uniform")),
        ("DPM++ 2M karras", ("DPM++ 2M", "Karras")),
        ("Euler sgm_uniform", ("Euler", "SGM Uniform")),
        ("LMS Polyexponential", ("LMS", "Polyexponential")),
        ("DPM++ 2M Align Your Steps", ("DPM++ 2M", "Align Your Steps")),
        ("DPM++ 2M KL Optimal", ("DPM++ 2M", "KL Optimal")),
        ("Euler a Simple", ("Euler a", "Simple")),
        ("Euler Normal", ("Euler", "Normal")),
        ("Euler DDIM", ("Euler", "DDIM")),
        ("Euler Beta", ("Euler", "Beta")),
        ("Euler Automatic", ("Euler", "Automatic")),
        ("Euler a", ("Euler a", None)),
        ("DDIM", ("DDIM", None)),
        ("Karras", ("Karras", None)),
        ("DPM++ 2M SDE Heun", ("DPM++ 2M SDE Heun", None)),
    ],
)
def test_split_sampler_name(name, expected):
    assert split_sampler_name(name) == expected


def test_legacy_hires_sampler_is_split_too():
    res = parse_infotext("p\nSteps: 1, Sampler: Euler, Seed: 1, Hires sampler: DPM++ SDE Karras")
    assert res["Hires sampler"] == "DPM++ SDE"
    assert res["Hires schedule type"] == "Karras"
    assert res["Schedule type"] == "Automatic"


def test_last_line_needs_three_params():
    text = _load("prompt_colon_last_line.txt")
    prompt, negative, params = split_infotext(text)
    assert prompt == "a watercolor of a fox in the snow\nstyle: loose brushwork, mood: calm"
    assert negative == ""
    assert params == {}
    res = parse_infotext(text)
    assert res["Prompt"] == prompt
    assert "style" not in res and "Steps" not in res
    # three matches make it a params line (keys are 2+ characters in A1111's re_param)
    assert split_infotext("cat\nab: 1, cd: 2, ef: 3")[2] == {"ab": "1", "cd": "2", "ef": "3"}
    assert split_infotext("cat\nab: 1, cd: 2")[0] == "cat\nab: 1, cd: 2"


def test_wxh_keys_split_into_width_and_height():
    res = parse_infotext(_load("img2img_seed_resize.txt"))
    assert (res["Size-1"], res["Size-2"]) == ("768", "576")
    assert (res["Seed resize from-1"], res["Seed resize from-2"]) == ("512", "384")
    res = parse_infotext("p\nSteps: 1, Seed: 2, Size: 512x512, Hires resize: 1024x1536")
    assert (res["Hires resize-1"], res["Hires resize-2"]) == ("1024", "1536")


def test_civitai_hashes_json_is_read_whole():
    res = parse_infotext(_load("civitai_hashes.txt"))
    assert res["Hashes"] == {"vae": "735e4c3a44", "lora:winter_style_v2": "1a2b3c4d5e6f", "model": "e6bb9ea85b"}
    assert res["Version"] == "v1.9.4"
    assert "lora" not in res  # A1111's parser would invent this key from the JSON's inside


def test_unicode_prompt():
    res = parse_infotext(_load("unicode_prompt.txt"))
    assert res["Prompt"] == "桜の木の下の猫, 水彩画, やわらかい光 🌸"
    assert res["Negative prompt"] == "低品質, ぼやけた"
    assert res["Lora hashes"] == "猫耳: 0123456789ab"


def test_defaults_filled_for_missing_keys():
    res = parse_infotext("a plain prompt\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    expected = {
        "Clip skip": "1",
        "Schedule type": "Automatic",
        "Hires resize-1": 0,
        "Hires resize-2": 0,
        "Hires sampler": "Use same sampler",
        "Hires schedule type": "Use same scheduler",
        "Hires checkpoint": "Use same checkpoint",
        "Hires prompt": "",
        "Hires negative prompt": "",
        "Mask mode": "Inpaint masked",
        "Masked content": "original",
        "Inpaint area": "Whole picture",
        "Masked area padding": 32,
        "RNG": "GPU",
        "Schedule max sigma": 0,
        "Schedule min sigma": 0,
        "Schedule rho": 0,
        "VAE Encoder": "Full",
        "VAE Decoder": "Full",
        "FP8 weight": "Disable",
        "Refiner switch by sampling steps": False,
    }
    assert {k: res[k] for k in expected} == expected
    assert "Emphasis" not in res  # the prompt has no emphasis
    assert "Cache FP16 weight for LoRA" not in res


def test_emphasis_default_only_when_the_prompt_uses_it():
    line = "\nSteps: 1, Sampler: Euler, Seed: 1"
    assert parse_infotext("a (cat)" + line)["Emphasis"] == "Original"
    assert parse_infotext("a [cat]" + line)["Emphasis"] == "Original"
    assert parse_infotext("a cat\nNegative prompt: (dog:1.3)" + line)["Emphasis"] == "Original"
    assert "Emphasis" not in parse_infotext("a (cat:1.0)" + line)
    assert "Emphasis" not in parse_infotext(r"a \(cat\)" + line)


def test_fp8_adds_cache_default():
    res = parse_infotext("p\nSteps: 1, Seed: 1, FP8 weight: Enable for SDXL")
    assert res["Cache FP16 weight for LoRA"] is False


def test_hypernet_is_appended_to_prompt():
    res = parse_infotext("cat\nSteps: 1, Seed: 1, Hypernet: anime, Hypernet strength: 0.7")
    assert res["Prompt"] == "cat<hypernet:anime:0.7>"


def test_old_first_pass_size_becomes_hires_resize():
    res = parse_infotext("p\nSteps: 1, Seed: 1, Size: 1024x1024, First pass size: 0x0")
    assert (res["Size-1"], res["Size-2"]) == (512, 512)
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 1024)


def test_flags_are_dropped_by_the_parser_like_a1111():
    text = format_infotext("p", "", {"Steps": 1, "Sampler": "Euler", "Magic": "Magic", "Seed": 3})
    assert text == "p\nSteps: 1, Sampler: Euler, Magic, Seed: 3"
    assert split_infotext(text)[2] == {"Steps": "1", "Sampler": "Euler", "Seed": "3"}


def test_crlf_and_single_line():
    res = parse_infotext("a cat\r\nNegative prompt: dog\r\nSteps: 3, Sampler: Euler, Seed: 9")
    assert (res["Prompt"], res["Negative prompt"], res["Steps"]) == ("a cat", "dog", "3")
    res = parse_infotext("Steps: 3, Sampler: Euler, Seed: 9")
    assert (res["Prompt"], res["Steps"]) == ("", "3")


def test_typed_values():
    res = parse_infotext_typed(_load("a1111_v1_10_hires_lora.txt"))
    assert res["Steps"] == 28 and type(res["Steps"]) is int
    assert res["Seed"] == 2876543210
    assert res["CFG scale"] == 6.5
    assert (res["Size-1"], res["Size-2"]) == (512, 768)
    assert res["Clip skip"] == 2
    assert res["Denoising strength"] == 0.45
    assert res["Hires upscale"] == 2.0 and type(res["Hires upscale"]) is float
    assert res["Hires steps"] == 12
    assert res["Sampler"] == "DPM++ 2M"
    res = parse_infotext_typed("p\nSteps: 20, Seed: abc, CFG scale: 7, Tiling: True")
    assert res["Seed"] == "abc"  # left as written when it is not a number
    assert res["CFG scale"] == 7.0 and type(res["CFG scale"]) is float
    assert res["Tiling"] is True
    assert res["Clip skip"] == 1
    assert res["Masked area padding"] == 32


def test_parse_rejects_non_text():
    with pytest.raises(ValueError, match="string"):
        parse_infotext(b"Steps: 1")


# ------------------------------------------------------------------ images

UNICODE_TEXT = "桜の猫, «fine» détails\nNegative prompt: ぼやけ\nSteps: 20, Sampler: Euler, Seed: 7, Size: 16x8"
LATIN_TEXT = "a cat, café\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 7, Size: 16x8"


def _image(mode="RGB"):
    image = Image.new(mode, (16, 8))
    image.putdata([((x * 16) % 256, (y * 32) % 256, 128, 200)[: len(mode)] for y in range(8) for x in range(16)])
    return image


def _png_chunk_types(data: bytes) -> list[bytes]:
    pos, types = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        types.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return types


def test_png_latin1_uses_text_chunk():
    data = image_bytes_with_infotext(_image(), LATIN_TEXT, "png")
    assert b"tEXt" in _png_chunk_types(data) and b"iTXt" not in _png_chunk_types(data)
    assert b"tEXtparameters\x00" + LATIN_TEXT.encode("latin-1") in data
    image = Image.open(io.BytesIO(data))
    assert read_infotext(image) == LATIN_TEXT
    assert image.info["parameters"] == LATIN_TEXT


def test_png_non_latin1_uses_itxt():
    data = image_bytes_with_infotext(_image(), UNICODE_TEXT, "png")
    assert b"iTXt" in _png_chunk_types(data) and b"tEXt" not in _png_chunk_types(data)
    assert UNICODE_TEXT.encode("utf-8") in data
    assert read_infotext(Image.open(io.BytesIO(data))) == UNICODE_TEXT


def test_png_pixels_survive():
    source = _image("RGBA")
    data = image_bytes_with_infotext(source, LATIN_TEXT, "png")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGBA" and decoded.tobytes() == source.tobytes()


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_exif_user_comment_is_a1111_exact(fmt, pil_format):
    data = image_bytes_with_infotext(_image(), UNICODE_TEXT, fmt)
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format
    assert read_infotext(image) == UNICODE_TEXT
    # raw piexif, as A1111 and other tools read it
    raw = piexif.load(data)["Exif"][piexif.ExifIFD.UserComment]
    assert raw == b"UNICODE\x00" + UNICODE_TEXT.encode("utf-16-be")
    assert piexif.helper.UserComment.load(raw) == UNICODE_TEXT


def test_jpeg_drops_alpha_and_webp_keeps_it():
    jpeg = Image.open(io.BytesIO(image_bytes_with_infotext(_image("RGBA"), "x", "jpeg")))
    assert jpeg.mode == "RGB"
    webp = Image.open(io.BytesIO(image_bytes_with_infotext(_image("RGBA"), "x", "webp")))
    assert webp.mode == "RGBA"


def test_no_infotext_writes_no_metadata():
    for fmt in ("png", "jpeg", "webp"):
        image = Image.open(io.BytesIO(image_bytes_with_infotext(_image(), None, fmt)))
        assert read_infotext(image) is None


def test_unknown_format_and_too_long_jpeg_are_value_errors():
    with pytest.raises(ValueError, match="png, jpeg or webp"):
        image_bytes_with_infotext(_image(), "x", "bmp")
    with pytest.raises(ValueError, match="too long for JPEG"):
        image_bytes_with_infotext(_image(), "x" * 40000, "jpeg")
    long_png = image_bytes_with_infotext(_image(), "x" * 40000, "png")
    assert read_infotext(Image.open(io.BytesIO(long_png))) == "x" * 40000


def _jpeg_with_exif(exif_dict) -> Image.Image:
    out = io.BytesIO()
    _image().save(out, "JPEG", exif=piexif.dump(exif_dict))
    return Image.open(io.BytesIO(out.getvalue()))


def test_user_comment_little_endian_and_ascii_are_read():
    le = _jpeg_with_exif({"Exif": {piexif.ExifIFD.UserComment: b"UNICODE\x00" + UNICODE_TEXT.encode("utf-16-le")}})
    assert read_infotext(le) == UNICODE_TEXT
    ascii_ = _jpeg_with_exif({"Exif": {piexif.ExifIFD.UserComment: b"ASCII\x00\x00\x00" + LATIN_TEXT.encode()}})
    assert read_infotext(ascii_) == LATIN_TEXT


def test_decode_user_comment_variants():
    assert decode_user_comment(b"UNICODE\x00" + "héllo".encode("utf-16-be")) == "héllo"
    assert decode_user_comment(b"UNICODE\x00" + "héllo".encode("utf-16-le")) == "héllo"
    assert decode_user_comment(b"UNICODE\x00" + "héllo".encode("utf-16")) == "héllo"  # with BOM
    assert decode_user_comment(b"ASCII\x00\x00\x00hello\x00") == "hello"
    assert decode_user_comment(b"\x00" * 8 + b"hello") == "hello"
    assert decode_user_comment("plain") == "plain"


def test_fooocus_png_and_jpeg():
    fooocus_json = json.dumps({"prompt": "a cat", "steps": 30, "sampler": "dpmpp_2m_sde_gpu"})
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", fooocus_json)
    info.add_text("fooocus_scheme", "fooocus")
    out = io.BytesIO()
    _image().save(out, "PNG", pnginfo=info)
    image = Image.open(io.BytesIO(out.getvalue()))
    assert read_infotext(image) == fooocus_json
    assert read_other_metadata(image) == {"fooocus_scheme": "fooocus"}

    # Fooocus JPEG/WebP: UserComment as ASCII in IFD0, scheme in MakerNote (PIL's Image.Exif)
    exif = Image.Exif()
    exif[0x9286] = LATIN_TEXT.replace("é", "e")
    exif[0x0131] = "Fooocus v2.5.5"
    exif[0x927C] = "a1111"
    out = io.BytesIO()
    _image().save(out, "JPEG", exif=exif)
    image = Image.open(io.BytesIO(out.getvalue()))
    assert read_infotext(image) == LATIN_TEXT.replace("é", "e")
    assert read_other_metadata(image)["fooocus_scheme"] == "a1111"


def test_png_text_after_idat_is_found(tmp_path):
    # Some tools append the text chunk after the image data; PIL only sees it once loaded.
    data = image_bytes_with_infotext(_image(), None, "png")
    chunk_body = b"parameters\x00" + LATIN_TEXT.encode("latin-1")
    import zlib

    chunk = len(chunk_body).to_bytes(4, "big") + b"tEXt" + chunk_body
    chunk += zlib.crc32(b"tEXt" + chunk_body).to_bytes(4, "big")
    iend = data.rindex(b"\x00\x00\x00\x00IEND")
    (tmp_path / "late.png").write_bytes(data[:iend] + chunk + data[iend:])
    with Image.open(tmp_path / "late.png") as image:
        assert "parameters" not in image.info
        assert read_infotext(image) == LATIN_TEXT


def test_other_apps_metadata_is_returned_raw():
    info = PngImagePlugin.PngInfo()
    comfy_prompt = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}})
    comfy_workflow = json.dumps({"nodes": [], "links": []})
    invoke = json.dumps({"positive_prompt": "猫", "seed": 5})
    info.add_text("prompt", comfy_prompt)
    info.add_text("workflow", comfy_workflow)
    info.add_text("invokeai_metadata", invoke)
    out = io.BytesIO()
    _image().save(out, "PNG", pnginfo=info)
    image = Image.open(io.BytesIO(out.getvalue()))
    assert read_infotext(image) is None
    assert read_other_metadata(image) == {
        "invokeai_metadata": invoke,
        "prompt": comfy_prompt,
        "workflow": comfy_workflow,
    }


def test_plain_image_has_nothing():
    assert read_infotext(_image()) is None
    assert read_other_metadata(_image()) == {}
