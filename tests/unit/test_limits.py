"""Request limits from the settings, and uploads decoded with byte and pixel limits."""
import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipelines.limits import RequestLimits
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from pipelines.uploads import decode_image


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for a huge all-black greyscale image, its IDAT a few KB of zlib."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"\x00" * (width // 8)  # 1-bit greyscale rows, filter byte 0
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(min(height, 64))) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_limits_come_from_settings_and_name_every_problem():
    limits = RequestLimits.from_settings(Settings(max_width=512, max_height=256, max_steps=10, max_batch_images=4,
                                                  max_upload_pixels=64 * 64))
    limits.check(GenerationRequest(width=512, height=256, steps=10, batch_count=2, batch_size=2))
    with pytest.raises(ValueError) as raised:
        limits.check(GenerationRequest(width=520, height=264, steps=11, batch_count=5))
    message = str(raised.value)
    for part in ("width 520 is above this server's limit of 512 (max_width)", "height 264", "steps 11",
                 "= 5 images is above this server's limit of 4"):
        assert part in message
    with pytest.raises(ValueError, match=r"init image 65x64 has more pixels than this server accepts"):
        limits.check(GenerationRequest(task="img2img", init_image=Image.new("RGB", (65, 64))))
    with pytest.raises(ValueError, match="negative prompt is 20001 characters, above this server's limit of 20000"):
        limits.check(GenerationRequest(negative_prompt="x" * 20001))


@pytest.mark.parametrize("changes, message", [
    (dict(width=0), "width must be a multiple of 8"), (dict(width=7), "width must be a multiple of 8"),
    (dict(width=100000), "width must be a multiple of 8"), (dict(steps=-1), "steps must be between"),
    (dict(steps=10**6), "steps must be between"), (dict(cfg_scale=float("nan")), "CFG scale must be between"),
])
def test_impossible_values_are_refused_by_the_request_itself(changes, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**changes)


def test_decode_refuses_bombs_before_decoding_and_non_images_and_big_files():
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="more than .* pixels"):
        decode_image(bomb)
    with pytest.raises(ValueError, match="8000x8000, more than the 16777216 pixels"):
        decode_image(png_bomb(8000, 8000))
    with pytest.raises(ValueError, match=r"the upload is not a readable image \(PNG, JPEG or WebP\)"):
        decode_image(b"%PDF-1.4 definitely not an image")
    with pytest.raises(ValueError, match="above the 1 MB limit"):
        decode_image(b"\0" * (2 << 20), max_bytes=1 << 20)
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (1, 2, 3)).save(buf, "PNG")
    good = buf.getvalue()
    assert decode_image(good).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="damaged or truncated"):
        decode_image(good[:60])
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global guard is left as it was


def test_api_base64_images_go_through_the_guard():
    data = GenerationRequest(task="img2img", init_image=Image.new("RGB", (64, 64))).to_dict()
    data["init_image"] = base64.b64encode(png_bomb(20000, 20000)).decode()
    with pytest.raises(ValueError, match="pixels"):
        GenerationRequest.from_dict(data)
    data["init_image"] = "not base64!!"
    with pytest.raises(ValueError, match="not valid base64"):
        GenerationRequest.from_dict(data)


def test_guarded_gradio_inputs_refuse_bombs_and_non_images_with_a_short_error(tmp_path):
    import copy

    import gradio as gr
    from gradio.data_classes import FileData

    from ui.guarded_images import guard_uploads

    image = guard_uploads(gr.Image(type="pil"), max_pixels=64 * 64)
    bomb, junk, big, good = (tmp_path / n for n in ("bomb.png", "junk.png", "big.png", "good.png"))
    bomb.write_bytes(png_bomb(20000, 20000))
    junk.write_text("not an image")
    Image.new("RGB", (65, 64)).save(big)
    Image.new("RGB", (64, 64), (9, 8, 7)).save(good)
    for path, message in ((bomb, "pixels"), (junk, "not a readable image"), (big, "65x64, more than the 4096 pixels")):
        with pytest.raises(gr.Error, match=message) as raised:
            image.preprocess(FileData(path=str(path)))
        assert "\n" not in raised.value.message and str(tmp_path) not in raised.value.message
    assert image.preprocess(FileData(path=str(good))).getpixel((0, 0)) == (9, 8, 7)
    clone = copy.deepcopy(image)  # Gradio keeps per-session copies of components
    with pytest.raises(gr.Error, match="pixels"):
        clone.preprocess(FileData(path=str(bomb)))
    assert not list(tmp_path.parent.glob("*.pyi")) and not list(Path(__file__).parents[2].glob("ui/*.pyi"))


def test_hires_target_and_hires_steps_count_against_the_limits():
    limits = RequestLimits.from_settings(Settings(max_width=1024, max_height=768, max_steps=30))
    hires = dict(prompt="x", width=512, height=384, enable_hr=True, hr_upscaler="Lanczos")
    limits.check(GenerationRequest(**hires, hr_scale=2.0, hr_second_pass_steps=30))  # 1024x768 fits exactly
    with pytest.raises(ValueError, match=r"hires fix target 1032x768 is above this server's limit of 1024x768"):
        limits.check(GenerationRequest(**hires, hr_resize_x=1032, hr_resize_y=768))
    with pytest.raises(ValueError, match=r"hires fix target 1536x1152"):
        limits.check(GenerationRequest(**hires, hr_scale=3.0))
    # hr_resize_y alone keeps the aspect ratio: 1024 high is 1365 wide, both above the limit
    with pytest.raises(ValueError, match=r"hires fix target 1360x1024"):
        limits.check(GenerationRequest(**hires, hr_resize_y=1024))
    with pytest.raises(ValueError, match=r"hires steps 31 is above this server's limit of 30 \(max_steps\)"):
        limits.check(GenerationRequest(**hires, hr_scale=1.5, hr_second_pass_steps=31))
    # without hires the same fields are ignored (A1111 keeps them in the request)
    limits.check(GenerationRequest(prompt="x", width=512, height=384, hr_scale=8.0, hr_second_pass_steps=400))


def test_controlnet_unit_images_count_against_the_upload_pixel_limit():
    from pipelines.control.units import ControlUnit

    limits = RequestLimits.from_settings(Settings(max_upload_pixels=64 * 64))
    small = ControlUnit(model="any", image=Image.new("RGB", (64, 64)))
    limits.check(GenerationRequest(control_units=(small,)))
    big = ControlUnit(model="any", image=Image.new("RGB", (64, 65)))
    with pytest.raises(ValueError, match=r"ControlNet unit 1 image 64x65 has more pixels than this server accepts"):
        limits.check(GenerationRequest(control_units=(small, big)))


def test_controlnet_base64_images_and_extras_files_go_through_the_upload_guard(tmp_path):
    from pipelines import extras
    from pipelines.control.units import ControlUnit, b64_to_image

    bomb = base64.b64encode(png_bomb(20000, 20000)).decode()
    for text in (bomb, "data:image/png;base64," + bomb):
        with pytest.raises(ValueError, match=r"ControlNet image: the image has more than .* pixels|"
                                             r"ControlNet image: the image is 20000x20000"):
            b64_to_image(text)
    with pytest.raises(ValueError, match=r"ControlNet image: the upload is not a readable image"):
        ControlUnit.from_a1111({"model": "m", "image": base64.b64encode(b"%PDF-1.4").decode()})
    with pytest.raises(ValueError, match="not valid base64"):
        b64_to_image("not base64!!")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (4, 5, 6)).save(buf, "PNG")
    assert b64_to_image(base64.b64encode(buf.getvalue()).decode()).getpixel((0, 0)) == (4, 5, 6)

    (tmp_path / "bomb.png").write_bytes(png_bomb(20000, 20000))
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "big.png").write_bytes(buf.getvalue() + b"\0" * (2 << 20))
    (tmp_path / "ok.png").write_bytes(buf.getvalue())
    for name, message in (("bomb.png", "bomb.png: the image has more than|bomb.png: the image is 20000x20000"),
                          ("notes.png", r"notes.png: the upload is not a readable image"),
                          ("big.png", r"big.png is above the 1 MB limit")):
        with pytest.raises(ValueError, match=message):
            list(extras.open_images([tmp_path / "ok.png", tmp_path / name], max_bytes=1 << 20))
    [image] = extras.open_images([tmp_path / "ok.png"])
    assert image.getpixel((0, 0)) == (4, 5, 6)


def test_the_controlnet_unit_upload_is_guarded_like_img2img(tmp_path):
    import gradio as gr
    from gradio.data_classes import FileData

    import app
    from pipelines.settings import Settings as AppSettings

    from ui.layout import build_ui

    settings = AppSettings(data_dir=tmp_path / "data", max_upload_pixels=32 * 32, control_net_unit_count=1)
    _blocks, reg = build_ui(app.build_context(settings))
    (tmp_path / "bomb.png").write_bytes(png_bomb(20000, 20000))
    Image.new("RGB", (33, 32)).save(tmp_path / "big.png")
    for tab in ("txt2img", "img2img"):
        component = reg[f"{tab}.cn0_image"]
        for name, message in (("bomb.png", "pixels"), ("big.png", "33x32, more than the 1024 pixels")):
            with pytest.raises(gr.Error, match=message):
                component.preprocess(FileData(path=str(tmp_path / name)))


def test_request_bodies_above_the_limit_get_413_before_the_app_reads_them():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient
    from starlette.middleware import Middleware

    from api.body_limit import BodyLimit

    seen = []
    app = FastAPI(middleware=[Middleware(BodyLimit, max_bytes=1000)])

    @app.post("/sdapi/v1/echo")
    async def echo(request: Request):
        body = await request.body()
        seen.append(len(body))
        return {"size": len(body)}

    client = TestClient(app)
    assert client.post("/sdapi/v1/echo", content=b"x" * 1000).json() == {"size": 1000}
    refused = client.post("/sdapi/v1/echo", content=b"x" * 1001)
    assert refused.status_code == 413 and "limit of 0.000953674 MB (max_request_mb)" in refused.json()["detail"]

    def chunks(count):  # no Content-Length: sent chunked, counted as it arrives
        for _ in range(count):
            yield b"y" * 300

    assert client.post("/sdapi/v1/echo", content=chunks(3)).json() == {"size": 900}
    assert client.post("/sdapi/v1/echo", content=chunks(4)).status_code == 413
    assert seen == [1000, 900]  # the refused bodies never reached the route
    assert Settings().request_body_limit() == int(25 * 2**20 * 4 / 3 * 2) + 2**20  # two 25 MB uploads as base64
    assert Settings(max_request_mb=2).request_body_limit() == 2 << 20
    with pytest.raises(ValueError, match="max_request_mb must be above 0"):
        Settings(max_request_mb=0)
