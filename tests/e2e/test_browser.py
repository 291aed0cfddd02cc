"""The page in headless Chromium (Debian's chromium driven by Playwright; no browser download):
generate from the txt2img tab, paint an inpaint mask in the browser, and carry parameters from
PNG Info to txt2img. Screenshots land in each test's temp dir."""
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium); "
                    "./webui.sh test installs it when run as root")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Not "networkidle": the Gradio queue keeps a connection open.
    page.goto(server.url, wait_until="domcontentloaded", timeout=TIMEOUT_MS)
    page.locator("#txt2img_prompt textarea").wait_for(timeout=TIMEOUT_MS)
    yield page
    page.screenshot(path=str(tmp_path / "last.png"), full_page=True)  # for a failed test's post-mortem
    page.close()
    assert errors == []


@pytest.fixture(scope="module")
def source_image(client) -> Path:
    """A saved txt2img output with known parameters, made through the API."""
    _gallery, info = client.predict(prompt="a quiet harbour", negative_prompt="rain", sampler="Euler",
                                    schedule="Automatic", steps=3, cfg_scale=6, width=64, height=64, seed=31337,
                                    batch_count=1, batch_size=1, checkpoint="", vae="Automatic",
                                    api_name="/txt2img")
    return Path(info["paths"][0])


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def wait_for_infotext(page, elem_id: str, needle: str) -> str:
    page.wait_for_function(
        f"() => (document.querySelector('#{elem_id} textarea') || {{}}).value?.includes({needle!r})",
        timeout=TIMEOUT_MS)
    return page.locator(f"#{elem_id} textarea").input_value()


def wait_for_uploads_to_settle(page, quiet_ms: int = 1500) -> None:
    """The image editor uploads its layers while and after painting; pressing Generate before
    they are in would send a half-painted mask."""
    pending = {"count": 0, "last": 0.0}

    def started(request):
        if "/upload" in request.url:
            pending["count"] += 1

    def ended(request):
        if "/upload" in request.url:
            pending["count"] -= 1
            pending["last"] = page.evaluate("performance.now()")

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    try:
        for _ in range(TIMEOUT_MS // 250):
            page.wait_for_timeout(250)
            if pending["count"] <= 0 and page.evaluate("performance.now()") - pending["last"] > quiet_ms:
                return
    finally:
        page.remove_listener("request", started)
        page.remove_listener("requestfinished", ended)
        page.remove_listener("requestfailed", ended)


def editor_zoom(page, elem_id: str) -> int:
    label = page.locator(f"#{elem_id}").get_by_text(re.compile(r"^\d+%$")).first
    return int(label.inner_text()[:-1])


def paint_a_stroke_through_the_middle(page, elem_id: str) -> None:
    """Paint once the editor has fitted its new background (a stroke made while it still zooms
    lands elsewhere in the image, or is lost), then check the paint shows on the canvas."""
    previous = None
    for _ in range(TIMEOUT_MS // 500):
        zoom = editor_zoom(page, elem_id)
        if zoom > 150 and zoom == previous:
            break
        previous = zoom
        page.wait_for_timeout(500)
    canvas = page.locator(f"#{elem_id} canvas").first
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 30, y)
    page.mouse.down()
    page.mouse.move(x + 30, y, steps=10)
    page.mouse.up()
    wait_for_uploads_to_settle(page)
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
    middle = shot[shot.shape[0] // 2 - 2: shot.shape[0] // 2 + 3, shot.shape[1] // 2 - 2: shot.shape[1] // 2 + 3]
    assert (middle > 240).all(), "the brush stroke did not show on the editor's canvas"


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_generate_from_the_page(server, page, tmp_path):
    prompt = "a small red house by a lake"
    page.locator("#txt2img_prompt textarea").fill(prompt)
    set_number(page, "txt2img_steps", 4)
    page.locator("#txt2img_seed input").fill("77")
    page.locator("#txt2img_generate").click()

    text = wait_for_infotext(page, "txt2img_infotext", "Seed: 77")
    page.wait_for_function(
        "() => { const i = document.querySelector('#txt2img_gallery img'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "txt2img.png"), full_page=True)

    assert text.startswith(prompt + "\nSteps: 4, Sampler: Euler a,")  # the tiny-world preset's sampler
    assert "Size: 64x64" in text and "Model: tiny" in text
    natural = page.locator("#txt2img_gallery img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [64, 64]
    assert (tmp_path / "txt2img.png").stat().st_size > 10_000
    saved = list((server.data_dir / "outputs" / "txt2img-images").glob("*/*-77.png"))
    assert len(saved) == 1

    # "Send to img2img" carries the image and its parameters over.
    page.locator("#txt2img_send_to_img2img").click()
    page.wait_for_function(
        f"() => document.querySelector('#img2img_prompt textarea')?.value === {prompt!r}", timeout=TIMEOUT_MS)
    assert page.locator("#img2img_seed input").input_value() == "77"
    assert page.locator("#img2img_steps input[type=number]").input_value() == "4"
    page.locator("#img2img_init_image img").wait_for(timeout=TIMEOUT_MS)


def test_inpaint_with_a_mask_painted_in_the_browser(server, page, source_image, tmp_path):
    page.get_by_role("tab", name="img2img").click()
    page.locator("#img2img_init_image input[type=file]").set_input_files(str(source_image))
    page.locator("#img2img_init_image img").wait_for(timeout=TIMEOUT_MS)
    with page.expect_response(lambda response: "/run/predict" in response.url, timeout=TIMEOUT_MS):
        page.locator("#img2img_send_to_inpaint").click()
    paint_a_stroke_through_the_middle(page, "img2img_inpaint_editor")

    page.locator("#img2img_prompt textarea").fill("a boat")
    set_number(page, "img2img_steps", 2)
    set_number(page, "img2img_denoising_strength", 1)
    set_number(page, "img2img_mask_blur", 0)
    page.locator("#img2img_seed input").fill("5")
    page.locator("#img2img_generate").click()
    text = wait_for_infotext(page, "img2img_infotext", "Seed: 5")
    page.screenshot(path=str(tmp_path / "inpaint.png"), full_page=True)

    assert "Denoising strength: 1" in text and "Mask blur: 0" in text and "Inpaint area: Whole picture" in text
    [result] = (server.data_dir / "outputs" / "img2img-images").glob("*/*-5.png")
    changed = np.abs(pixels(result) - pixels(source_image)).sum(axis=-1) > 0
    # The stroke went through the middle: the middle changed, the corners are untouched.
    assert changed[28:36, 28:36].all()
    for corner in (changed[:8, :8], changed[:8, -8:], changed[-8:, :8], changed[-8:, -8:]):
        assert not corner.any()
    assert 0.05 < changed.mean() < 0.9


def test_png_info_sends_parameters_to_txt2img(page, source_image, tmp_path):
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#png_info_image input[type=file]").set_input_files(str(source_image))
    text = wait_for_infotext(page, "png_info_infotext", "Seed: 31337")
    assert text.startswith("a quiet harbour\nNegative prompt: rain\nSteps: 3, Sampler: Euler,")
    page.locator("#png_info_send_to_txt2img").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea')?.value === 'a quiet harbour'", timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "sent.png"), full_page=True)
    assert page.locator("#txt2img_negative_prompt textarea").input_value() == "rain"
    assert page.locator("#txt2img_seed input").input_value() == "31337"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "3"
    assert page.locator("#txt2img_cfg_scale input[type=number]").input_value() == "6"
    assert page.locator("#txt2img_width input[type=number]").input_value() == "64"


def test_interrupt_stops_a_long_generation(server, page, tmp_path):
    page.locator("#txt2img_prompt textarea").fill("a very long walk")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_width", 256)
    set_number(page, "txt2img_height", 256)
    page.locator("#txt2img_seed input").fill("808")
    page.locator("#txt2img_generate").click()
    # Progress appears on its strip above the gallery; then stop.
    page.locator("#txt2img_progress").get_by_text("step", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "progress.png"), full_page=True)
    page.locator("#txt2img_interrupt").click()
    page.get_by_text("Interrupted: 1 of 1 image(s) finished").wait_for(timeout=TIMEOUT_MS)
    text = wait_for_infotext(page, "txt2img_infotext", "Seed: 808")
    assert "Size: 256x256" in text
    [saved] = (server.data_dir / "outputs" / "txt2img-images").glob("*/*-808.png")
    with Image.open(saved) as image:
        assert image.size == (256, 256)
