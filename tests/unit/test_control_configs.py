"""ControlNet files as users have them, header only (sparse files from tests/stripped.py): the
bundled configs read each family's real LDM layout, and with a real-layout SD1.5 checkpoint an
SDXL ControlNet is refused and not offered."""
import types

import pytest
import torch

from pipelines import probe
from pipelines.arch import Arch
from pipelines.control import models
from pipelines.hashing import HashCache
from pipelines.registry import ModelPaths, ModelRegistry
from tests.control_factories import ldm_controlnet_layout
from tests.stripped import sd1_layout, write_stripped
from ui import control_tab

XL_KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def header_shapes(path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in probe.read_safetensors_header(path).tensors.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_bundled_config_builds_the_model_the_real_layout_converts_to(family, tmp_path):
    from diffusers import ControlNetModel

    path = write_stripped(tmp_path / f"control_v11p_{family}_canny.safetensors", ldm_controlnet_layout(family))
    shapes = header_shapes(path)
    assert models.family_of_state_shapes(shapes) == family
    config = ControlNetModel.load_config(models.config_dir(family))
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = models.diffusers_state({k: torch.empty(s, device="meta") for k, s in shapes.items()}, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    if family == "sdxl":  # the size/time embedding diffusers' converter alone leaves out
        assert converted["add_embedding.linear_1.weight"].shape == (1280, 2816)


@pytest.fixture
def registry(tmp_path):
    models_dir = tmp_path / "models"
    write_stripped(models_dir / "Stable-diffusion" / "sd15.safetensors", sd1_layout())
    folder = models_dir / "ControlNet"
    write_stripped(folder / "control_v11p_sd15_canny.safetensors", ldm_controlnet_layout("sd1"))
    write_stripped(folder / "control_v11p_sd21_canny.safetensors", ldm_controlnet_layout("sd2"))
    write_stripped(folder / "controlnet-canny-sdxl-1.0.safetensors",
                   {XL_KEY: (640, 2048), "add_embedding.linear_1.weight": (1280, 2816)})
    registry = ModelRegistry(ModelPaths(models_dir=models_dir, embeddings_dir=tmp_path / "embeddings",
                                        builtin_dir=tmp_path / "builtin"), HashCache(tmp_path / "cache.json"))
    registry.refresh()
    return registry


def test_sdxl_controlnet_with_an_sd15_checkpoint_is_refused_naming_both(registry):
    checkpoint = registry.find("checkpoint", "sd15")
    assert checkpoint.arch is Arch.SD1
    xl = registry.find("controlnet", "controlnet-canny-sdxl-1.0")
    with pytest.raises(ValueError) as error:
        models.check_compatible(xl, models.family_of_entry(xl), checkpoint.arch, checkpoint.name)
    message = str(error.value)
    assert "controlnet-canny-sdxl-1.0" in message and "sd15.safetensors" in message
    assert "is for SDXL" in message and "pick a SD1.x ControlNet" in message
    sd15 = registry.find("controlnet", "control_v11p_sd15_canny")
    models.check_compatible(sd15, models.family_of_entry(sd15), checkpoint.arch, checkpoint.name)  # no error


def test_model_choices_for_an_sd15_checkpoint_leave_out_other_families(registry):
    ctx = types.SimpleNamespace(registry=registry)
    assert control_tab.model_choices(ctx, "sd15.safetensors") == ["None", "control_v11p_sd15_canny.safetensors"]
