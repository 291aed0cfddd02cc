"""Built-in extensions in the real page: the X/Y/Z plot accordion makes and saves a grid through
the real Gradio event (gr.Request injected), and the Extensions tab lists the built-ins."""
import pytest
from PIL import Image

from pipelines.metadata import read_infotext
from tests.e2e.test_browser import TIMEOUT_MS, browser, page, set_number  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def choose(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    page.get_by_role("option", name=option, exact=True).click()


def test_xyz_plot_accordion_makes_and_saves_a_grid(server, page, tmp_path):
    page.locator("#txt2img_prompt textarea").fill("a red kite")
    set_number(page, "txt2img_steps", 1)
    page.locator("#txt2img_seed input").fill("4242")
    page.locator("#ext_xyz-plot_txt2img_accordion").get_by_text("X/Y/Z plot").first.click()
    choose(page, "txt2img_xyz_x_type", "Steps")
    page.locator("#txt2img_xyz_x_values textarea, #txt2img_xyz_x_values input").first.fill("1, 2")
    page.locator("#txt2img_xyz_run").click()
    page.wait_for_function(
        "() => (document.querySelector('#txt2img_xyz_infotext textarea') || {}).value?.includes('X Type: Steps')",
        timeout=TIMEOUT_MS)
    text = page.locator("#txt2img_xyz_infotext textarea").input_value()
    page.screenshot(path=str(tmp_path / "xyz.png"), full_page=True)
    assert 'X Values: "1, 2"' in text and "Seed: 4242" in text
    grids = list((server.data_dir / "outputs" / "txt2img-grids").glob("*/*-4242.png"))
    assert len(grids) == 1
    with Image.open(grids[0]) as grid:
        assert read_infotext(grid) == text and grid.width >= 128


def test_extensions_tab_lists_the_built_ins(page):
    page.get_by_role("tab", name="Extensions").click()
    table = page.locator("#extensions_table")
    table.get_by_text("xyz-plot").first.wait_for(timeout=TIMEOUT_MS)
    assert table.get_by_text("prompts-from-file").count() >= 1
    assert page.locator("#extensions_install").is_enabled()  # loopback: changes allowed
