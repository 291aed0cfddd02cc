import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from pipelines.arch import Arch
from pipelines.probe import (SafetensorsHeaderError, TensorInfo, probe_checkpoint, probe_checkpoint_file,
                             probe_controlnet, probe_diffusers_folder, probe_embedding, probe_lora_base,
                             probe_vae, read_safetensors_header)
from tests import stripped


def header_of(tmp_path, tensors, metadata=None):
    return read_safetensors_header(stripped.write_stripped(tmp_path / "m.safetensors", tensors, metadata))


def test_header_matches_what_safetensors_itself_writes(tmp_path):
    path = tmp_path / "real.safetensors"
    save_file({"a.weight": torch.zeros(3, 5, dtype=torch.float16), "b": torch.ones(7)}, str(path),
              metadata={"ss_output_name": "x"})
    header = read_safetensors_header(path)
    assert header.tensors == {"a.weight": TensorInfo("F16", (3, 5)), "b": TensorInfo("F32", (7,))}
    assert header.metadata == {"ss_output_name": "x"}


def test_stripped_file_is_sparse_and_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    path = stripped.write_stripped(tmp_path / "sdxl.safetensors", stripped.sdxl_layout())
    with safe_open(str(path), "pt") as f:  # the real library accepts the stripped file
        assert f.get_slice(stripped.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight").get_shape() == [640, 2048]
    assert path.stat().st_size > 5_000_000
    assert path.stat().st_blocks * 512 < 1_000_000  # sparse: the zeros take no disk


@pytest.mark.parametrize("layout, metadata, expected", [
    (stripped.sd1_layout(), None, Arch.SD1),
    (stripped.sd1_layout(inpaint=True), None, Arch.SD1_INPAINT),
    (stripped.sd2_layout(), None, Arch.SD2),
    (stripped.sd2_layout(), {"modelspec.prediction_type": "v"}, Arch.SD2_V),
    (stripped.sd2_layout(), {"modelspec.architecture": "stable-diffusion-v2-768-v"}, Arch.SD2_V),
    (stripped.sdxl_layout(), None, Arch.SDXL),
    (stripped.sdxl_refiner_layout(), None, Arch.SDXL_REFINER),
    (stripped.tinyworld_layout(), stripped.TINYWORLD_METADATA, Arch.TINYWORLD),
    (stripped.tinyworld_layout(), None, Arch.TINYWORLD),  # SD1 layout at toy widths
    (stripped.vae_layout(), None, Arch.UNKNOWN),
    (stripped.kohya_lora_sd1_layout(), stripped.KOHYA_SD1_METADATA, Arch.UNKNOWN),
], ids=["sd1", "sd1-inpaint", "sd2", "sd2-v-modelspec", "sd2-v-arch", "sdxl", "refiner", "tinyworld",
        "tiny-no-metadata", "vae", "lora"])
def test_probe_checkpoint(tmp_path, layout, metadata, expected):
    assert probe_checkpoint(header_of(tmp_path, layout, metadata)) is expected


def test_unsupported_variants_are_unknown(tmp_path):
    sd2_inpaint = stripped.sd2_layout() | {stripped.UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}
    pix2pix = stripped.sd1_layout() | {stripped.UNET + "input_blocks.0.0.weight": (320, 8, 3, 3)}
    assert probe_checkpoint(header_of(tmp_path, sd2_inpaint)) is Arch.UNKNOWN
    assert probe_checkpoint(header_of(tmp_path, pix2pix)) is Arch.UNKNOWN


def test_unknown_context_width_is_unknown(tmp_path):
    layout = stripped.sd1_layout() | {stripped.UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 4096)}
    assert probe_checkpoint(header_of(tmp_path, layout)) is Arch.UNKNOWN


def test_text_encoder_decides_when_the_unet_has_no_attention_key(tmp_path):
    layout = {k: v for k, v in stripped.sd2_layout().items() if "attn2" not in k}
    assert probe_checkpoint(header_of(tmp_path, layout)) is Arch.SD2


def test_yaml_sidecar_marks_sd2_v(tmp_path):
    path = stripped.write_stripped(tmp_path / "sd21.safetensors", stripped.sd2_layout())
    assert probe_checkpoint_file(path) is Arch.SD2
    (tmp_path / "sd21.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    assert probe_checkpoint_file(path) is Arch.SD2_V
    (tmp_path / "sd21.yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    assert probe_checkpoint_file(path) is Arch.SD2


def test_probe_vae(tmp_path):
    assert probe_vae(header_of(tmp_path, stripped.vae_layout()))
    prefixed = {"vae." + k: v for k, v in stripped.vae_layout().items()}
    assert probe_vae(header_of(tmp_path, prefixed))
    assert not probe_vae(header_of(tmp_path, stripped.sd1_layout()))  # a full checkpoint
    assert not probe_vae(header_of(tmp_path, stripped.kohya_lora_sd1_layout()))


@pytest.mark.parametrize("layout, metadata, expected", [
    (stripped.kohya_lora_sd1_layout(), stripped.KOHYA_SD1_METADATA, Arch.SD1),
    (stripped.kohya_lora_sd1_layout(), None, Arch.SD1),  # from the 768-wide text encoder
    (stripped.kohya_lora_sdxl_layout(), stripped.KOHYA_SDXL_METADATA, Arch.SDXL),
    (stripped.kohya_lora_sdxl_layout(), None, Arch.SDXL),  # lora_te2_ keys
    (stripped.kohya_lora_sd1_layout(), {"ss_v2": "True"}, Arch.SD2),
    (stripped.kohya_lora_sd1_layout(), {"ss_base_model_version": "sd_v2_v"}, Arch.SD2_V),
    (stripped.kohya_lora_sd1_layout(), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, Arch.SDXL),
    (stripped.kohya_lora_sd1_layout(), {"modelspec.architecture": "easel/tiny-world-v1/lora"}, Arch.TINYWORLD),
    ({"lora_unet_x_attn2_to_k.lora_down.weight": (8, 1024), "lora_unet_x_attn2_to_k.lora_up.weight": (320, 8)},
     None, Arch.SD2),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)}, None, Arch.SDXL),
    ({"something.else": (3, 3)}, None, Arch.UNKNOWN),
])
def test_probe_lora_base(tmp_path, layout, metadata, expected):
    assert probe_lora_base(header_of(tmp_path, layout, metadata)) is expected


def test_probe_embedding_and_controlnet(tmp_path):
    assert probe_embedding(header_of(tmp_path, {"emb_params": (4, 768)})) is Arch.SD1
    assert probe_embedding(header_of(tmp_path, {"emb_params": (2, 1024)})) is Arch.SD2
    assert probe_embedding(header_of(tmp_path, {"clip_l": (3, 768), "clip_g": (3, 1280)})) is Arch.SDXL
    cn = {"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert probe_controlnet(header_of(tmp_path, cn)) is Arch.SD1
    assert probe_controlnet(header_of(tmp_path, {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
                                                 (640, 2048)})) is Arch.SDXL


def _diffusers_folder(root, cross_dim, in_channels=4, prediction="epsilon"):
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross_dim, "in_channels": in_channels}))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    return root


@pytest.mark.parametrize("cross_dim, in_channels, prediction, expected", [
    (768, 4, "epsilon", Arch.SD1), (768, 9, "epsilon", Arch.SD1_INPAINT), (1024, 4, "epsilon", Arch.SD2),
    (1024, 4, "v_prediction", Arch.SD2_V), (2048, 4, "epsilon", Arch.SDXL), (1280, 4, "epsilon", Arch.SDXL_REFINER),
    (64, 4, "epsilon", Arch.TINYWORLD), (2048, 9, "epsilon", Arch.UNKNOWN), (4096, 4, "epsilon", Arch.UNKNOWN),
])
def test_probe_diffusers_folder(tmp_path, cross_dim, in_channels, prediction, expected):
    assert probe_diffusers_folder(_diffusers_folder(tmp_path / "m", cross_dim, in_channels, prediction)) is expected


def test_diffusers_folder_without_model_index_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        probe_diffusers_folder(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"abc", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "not a safetensors file"),
    (struct.pack("<Q", 9) + b"{not json", "damaged"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", 64) + json.dumps({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode().ljust(64)
     + b"\0" * 4, "truncated"),
    (struct.pack("<Q", 32) + json.dumps({"w": {"dtype": "F16"}}).encode().ljust(32), "entry 'w'"),
])
def test_corrupt_headers_raise_value_errors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsHeaderError, match=message):
        read_safetensors_header(path)


def test_header_read_does_not_read_the_data(tmp_path, monkeypatch):
    path = stripped.write_stripped(tmp_path / "sd1.safetensors", stripped.sd1_layout())
    header_bytes = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    reads = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    read_safetensors_header(path)
    assert sum(reads) == header_bytes < path.stat().st_size
