"""The ControlNet accordion's pure helpers: form <-> units, model list filtered by the
checkpoint's base model, the Preview map and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import app
from pipelines.control import ControlUnit
from pipelines.settings import Settings
from tests import factories
from ui import control_tab
from ui.control_form import control_fields, form_from_units, units_from_form


def test_form_values_become_enabled_units_in_order():
    values = {name: None for name in control_fields(3)}
    values |= {"cn0_enabled": False, "cn1_enabled": True, "cn1_model": "m", "cn1_weight": 0.5,
               "cn1_control_mode": "ControlNet is more important", "cn2_enabled": True, "cn2_module": "canny"}
    units = units_from_form(values)
    assert [u.model for u in units] == ["m", "None"]
    assert units[0].weight == 0.5 and units[0].control_mode == "ControlNet is more important"
    with pytest.raises(ValueError, match="ControlNet unit 1: .*weight"):
        units_from_form(values | {"cn1_weight": 5})


def test_units_back_to_form_disable_the_rest():
    values = form_from_units([ControlUnit(module="canny", model="m", weight=0.3)], 3)
    assert values["cn0_enabled"] is True and values["cn0_weight"] == 0.3
    assert values["cn1_enabled"] is False and values["cn2_enabled"] is False
    assert not any(name.endswith("_image") for name in values)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cn-choices")
    factories.write_tiny_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    folder = data_dir / "models" / "ControlNet"
    folder.mkdir(parents=True)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(2, 64)}, str(folder / "tiny_cn.safetensors"))
    save_file({key: torch.zeros(2, 2048)}, str(folder / "xl_cn.safetensors"))
    save_file({key: torch.zeros(2, 768)}, str(folder / "sd15_cn.safetensors"))
    return app.build_context(Settings(data_dir=data_dir, device="cpu"))


def test_model_choices_fit_the_checkpoint(ctx):
    assert control_tab.model_choices(ctx, "tiny.safetensors") == ["None", "tiny_cn.safetensors"]


def test_preview_shows_the_map_and_explains_missing_annotators(ctx, tmp_path):
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill="white")
    edges = control_tab.preview_map(tmp_path, image, "canny", 64, False, "Crop and Resize", -1, -1, 64, 64)
    assert np.asarray(edges)[16:48, 15:18].any() and not np.asarray(edges)[24:40, 24:40].any()
    perfect = control_tab.preview_map(tmp_path, image, "canny", 512, True, "Crop and Resize", -1, -1, 128, 128)
    assert perfect.size == (128, 128)  # pixel perfect: the map at the generation size
    with pytest.raises(ValueError, match="annotators"):
        control_tab.preview_map(tmp_path, image, "depth_midas", 64, False, "Crop and Resize", -1, -1, 64, 64)
    with pytest.raises(ValueError, match="upload a control image"):
        control_tab.preview_map(tmp_path, None, "canny", 64, False, "Crop and Resize", -1, -1, 64, 64)
