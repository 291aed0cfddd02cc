"""The weight-needing preprocessors run when their files are in models/annotators: each test
saves a random-weight network of the real architecture where users put the real one (the
lllyasviel file names, the controlnet_aux HF cache layout, transformers folders), runs the
preprocessor on two drawn images and compares the maps (size, range, they follow the input).

controlnet_aux needs torchvision: its tests skip where it is not installed (the torch 2.13 env);
the transformers depth tests run everywhere."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.control import annotators, preprocessors

AUX = "lllyasviel/Annotators"


def aux_module(name: str):
    pytest.importorskip("torchvision", reason="controlnet_aux needs torchvision (the torch 2.14 environment has it)")
    return pytest.importorskip(name, reason="controlnet_aux is not installed (requirements-nodeps.txt)")


def drawings(size: int = 64) -> tuple[Image.Image, Image.Image]:
    """A white square on black, and a grey disc on a lighter background."""
    first = Image.new("RGB", (size, size))
    ImageDraw.Draw(first).rectangle((16, 16, size - 17, size - 17), fill="white")
    second = Image.new("RGB", (size, size), (200, 180, 160))
    ImageDraw.Draw(second).ellipse((8, 20, 40, 52), fill=(60, 60, 60))
    return first, second


def save_weights(module, path: Path, wrap=None) -> Path:
    """fp16 (half the disk; the loader casts back), optionally wrapped as the real file is."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(state) if wrap else state, path)
    return path


def maps(name: str, models_dir: Path, **kwargs) -> list[np.ndarray]:
    out = []
    for image in drawings():
        result = preprocessors.detect(name, image, resolution=64, models_dir=models_dir, **kwargs)
        assert result.mode == "RGB" and result.size == (64, 64)
        out.append(np.asarray(result))
    return out


def assert_follows_the_input(first: np.ndarray, second: np.ndarray, min_change: float = 1.0) -> None:
    assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
    assert first.max() > first.min() or second.max() > second.min()  # not a blank canvas
    assert np.abs(first.astype(int) - second).mean() > min_change


LAYOUTS = {
    "repo": lambda root, name: root / "annotators" / AUX / name,
    "bare": lambda root, name: root / "annotators" / name,
    "hf-cache": lambda root, name: root / "annotators" / "models--lllyasviel--Annotators" / "snapshots" / "0a1b" / name,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hed_runs_from_each_file_layout(tmp_path, layout):
    hed = aux_module("controlnet_aux.hed")
    save_weights(hed.ControlNetHED_Apache2(), LAYOUTS[layout](tmp_path, "ControlNetHED.pth"))
    assert_follows_the_input(*maps("softedge_hed", tmp_path))


def test_pidinet_runs_from_its_wrapped_checkpoint(tmp_path):
    model = aux_module("controlnet_aux.pidi.model")
    save_weights(model.pidinet(), LAYOUTS["repo"](tmp_path, "table5_pidinet.pth"),
                 wrap=lambda state: {"state_dict": {f"module.{k}": v for k, v in state.items()}})
    # a random PiDiNet's edge map stays close to 0.5 everywhere: the change is small but there
    assert_follows_the_input(*maps("softedge_pidinet", tmp_path), min_change=0.05)


@pytest.mark.parametrize("name, filename", [("lineart_realistic", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")])
def test_lineart_runs(tmp_path, name, filename):
    lineart = aux_module("controlnet_aux.lineart")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_weights(lineart.Generator(3, 1, 3), LAYOUTS["repo"](tmp_path, filename))
    assert_follows_the_input(*maps(name, tmp_path))


def test_mlsd_runs_with_its_thresholds(tmp_path):
    mlsd = aux_module("controlnet_aux.mlsd.models.mbv2_mlsd_large")
    save_weights(mlsd.MobileV2_MLSD_Large(), LAYOUTS["bare"](tmp_path, "mlsd_large_512_fp32.pth"))
    first, second = maps("mlsd", tmp_path, threshold_a=0.01, threshold_b=0.01)
    assert first.dtype == np.uint8 and first.shape == second.shape == (64, 64, 3)
    assert preprocessors.get("mlsd").threshold_a.label == "MLSD Value Threshold"


def test_openpose_body_runs_and_reads_the_input(tmp_path, monkeypatch):
    model = aux_module("controlnet_aux.open_pose.model")
    # the original file's keys lack the sub-network prefix ("conv1_1.weight", not "model0.conv1_1.weight")
    save_weights(model.bodypose_model(), LAYOUTS["repo"](tmp_path, "body_pose_model.pth"),
                 wrap=lambda state: {k.split(".", 1)[1]: v for k, v in state.items()})
    seen = []
    original = model.bodypose_model.forward
    monkeypatch.setattr(model.bodypose_model, "forward",
                        lambda self, x: seen.append(float(x.mean())) or original(self, x))
    first, second = maps("openpose", tmp_path)
    # random weights find no person: a black canvas of the right size, but the network saw each image
    assert first.shape == second.shape == (64, 64, 3) and first.dtype == np.uint8
    assert len(seen) >= 2 and len(set(round(v, 4) for v in seen)) >= 2


def test_openpose_full_lists_every_file_it_needs(tmp_path):
    with pytest.raises(preprocessors.PreprocessorUnavailable) as error:
        preprocessors.detect("openpose_full", drawings()[0], models_dir=tmp_path)
    for filename in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"):
        assert f"put {filename} (from the {AUX} repository) at {tmp_path / 'annotators' / AUX / filename}" \
            in str(error.value)


def test_a_pickle_with_code_is_refused(tmp_path):
    aux_module("controlnet_aux.hed")
    path = LAYOUTS["repo"](tmp_path, "ControlNetHED.pth")
    path.parent.mkdir(parents=True)
    torch.save({"weight": torch.zeros(1), "extra": Path("x")}, path)  # a non-tensor object: full unpickling
    with pytest.raises(ValueError, match="needs full unpickling"):
        preprocessors.detect("softedge_hed", drawings()[0], models_dir=tmp_path)


# --- transformers: depth and segmentation from local folders -----------------------------------

def tiny_dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, is_hybrid=False)
    return DPTForDepthEstimation(config)


def tiny_depth_anything():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                            patch_size=14, image_size=28, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    return DepthAnythingForDepthEstimation(config)


def save_folder(model, folder: Path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Path:
    import json

    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(mean), "image_std": list(std)}))
    return folder


@pytest.mark.parametrize("name, rel, make", [
    ("depth_midas", "Intel/dpt-hybrid-midas", tiny_dpt),
    ("depth_anything", "LiheYoung/depth-anything-large-hf", tiny_depth_anything),
])
def test_depth_from_a_transformers_folder(tmp_path, name, rel, make):
    with pytest.raises(preprocessors.PreprocessorUnavailable, match=f"put the {rel} folder"):
        preprocessors.detect(name, drawings()[0], models_dir=tmp_path)
    save_folder(make(), tmp_path / "annotators" / rel)
    first, second = maps(name, tmp_path)
    assert_follows_the_input(first, second)
    assert (first[..., 0] == first[..., 1]).all() and first.min() == 0 and first.max() == 255  # grey, stretched


def test_depth_from_the_hf_cache_layout(tmp_path):
    save_folder(tiny_dpt(), tmp_path / "annotators" / "models--Intel--dpt-hybrid-midas" / "snapshots" / "c0ffee")
    assert annotators.locate(tmp_path, "Intel/dpt-hybrid-midas/") is not None
    assert_follows_the_input(*maps("depth", tmp_path))  # the extension's old name


def test_segmentation_colours_ade20k_classes(tmp_path):
    util = aux_module("controlnet_aux.util")
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=150, use_auxiliary_head=False,
                           auxiliary_in_channels=32)
    save_folder(UperNetForSemanticSegmentation(config), tmp_path / "annotators" / "openmmlab/upernet-convnext-small",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    first, second = maps("seg_ufade20k", tmp_path)
    assert first.shape == (64, 64, 3) and np.abs(first.astype(int) - second).mean() > 0
    palette = {tuple(c) for c in util.ade_palette()}
    assert {tuple(p) for p in first.reshape(-1, 3)} <= palette  # every pixel is an ADE20K class colour


# --- the big networks (50M+ parameters each): slow ----------------------------------------------

@pytest.mark.slow
def test_lineart_anime_runs(tmp_path):
    import functools

    from torch import nn

    anime = aux_module("controlnet_aux.lineart_anime")
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    save_weights(anime.UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False),
                 LAYOUTS["repo"](tmp_path, "netG.pth"), wrap=lambda state: {f"module.{k}": v for k, v in state.items()})
    assert_follows_the_input(*maps("lineart_anime", tmp_path), min_change=0.05)


@pytest.mark.slow
def test_openpose_full_loads_its_three_networks_and_runs(tmp_path):
    model = aux_module("controlnet_aux.open_pose.model")
    face = aux_module("controlnet_aux.open_pose.face")
    strip = lambda state: {k.split(".", 1)[1]: v for k, v in state.items()}  # noqa: E731 (the files' key names)
    save_weights(model.bodypose_model(), LAYOUTS["repo"](tmp_path, "body_pose_model.pth"), wrap=strip)
    save_weights(model.handpose_model(), LAYOUTS["repo"](tmp_path, "hand_pose_model.pth"), wrap=strip)
    save_weights(face.FaceNet(), LAYOUTS["repo"](tmp_path, "facenet.pth"))
    # random weights find no person, so hands and faces are not searched: a black canvas
    first, second = maps("openpose_full", tmp_path)
    assert first.shape == second.shape == (64, 64, 3) and first.max() == 0


def test_normal_bae_runs_from_its_wrapped_checkpoint(tmp_path):
    import types

    nnet = aux_module("controlnet_aux.normalbae.nets.NNET")
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    torch.manual_seed(0)
    # scannet.pt as Bae et al. saved it: {"model": state dict of the DataParallel-wrapped NNET}
    save_weights(nnet.NNET(args), LAYOUTS["repo"](tmp_path, "scannet.pt"),
                 wrap=lambda state: {"model": {f"module.{k}": v for k, v in state.items()}})
    first, second = maps("normal_bae", tmp_path)
    assert_follows_the_input(first, second)
    # a map of unit normals: (n + 1) / 2 per channel, so no channel is stuck at one end
    assert all(0 < m[..., c].mean() < 255 for m in (first, second) for c in range(3))
