"""The annotator networks behind the weight-needing ControlNet preprocessors, from local files only.

Where the files are looked for, under models/annotators/ (`ANNOTATORS_FOLDER`):
- lllyasviel's `.pth` files as `<repo>/<file>` (lllyasviel/Annotators/ControlNetHED.pth), as a
  bare `<file>`, or in the Hugging Face cache layout that controlnet_aux downloads into
  (`models--lllyasviel--Annotators/snapshots/<revision>/<file>`);
- transformers folders (config.json, weights, preprocessor_config.json, as on the Hub) as
  `<org>/<name>/` (Intel/dpt-hybrid-midas/), or in the cache layout (`models--Intel--dpt-hybrid-midas/
  snapshots/<revision>/`).

The networks: controlnet_aux's classes (HED, PiDiNet, lineart, anime lineart, MLSD, OpenPose,
NormalBae),
given weights read here with `torch.load(weights_only=True)`, so nothing is ever downloaded;
depth (DPT/MiDaS, ZoeDepth, Depth Anything) and segmentation (UperNet) are transformers models.
Each run loads its network afresh (nothing is kept between calls). A missing file or package is
reported by `unavailable_reason` with every file the preprocessor needs and where it goes.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Sequence

import numpy as np

ANNOTATORS_FOLDER = "annotators"
AUX_REPO = "lllyasviel/Annotators"
FOLDER_FILES = "config.json, model.safetensors and preprocessor_config.json"
# ImageNet statistics: what the transformers depth/segmentation processors default to.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class AnnotatorError(ValueError):
    """An annotator file that is there but cannot be read or run."""


@dataclass(frozen=True)
class Annotator:
    files: tuple[str, ...]  # relative to models/annotators/; "<org>/<name>/" is a transformers folder
    packages: tuple[str, ...]  # what its network runs on (import names)
    run: Callable[[np.ndarray, float, float, Sequence[Path]], np.ndarray]  # RGB HWC uint8 -> RGB HWC uint8


# --- finding the files -----------------------------------------------------------------------

def expected_path(models_dir: Path, rel: str) -> Path:
    return Path(models_dir) / ANNOTATORS_FOLDER / rel.rstrip("/")


def locate(models_dir: Path, rel: str) -> Path | None:
    """The file or folder `rel` names, in any of the layouts of the module doc; None if absent."""
    root = Path(models_dir) / ANNOTATORS_FOLDER
    folder = rel.endswith("/")
    parts = rel.rstrip("/").split("/")
    repo, name = ("/".join(parts), None) if folder else ("/".join(parts[:-1]), parts[-1])
    candidates = [root / rel.rstrip("/")]
    if not folder:
        candidates.append(root / name)
    if repo:
        snapshots = root / f"models--{repo.replace('/', '--')}" / "snapshots"
        if snapshots.is_dir():
            candidates += [s if folder else s / name for s in sorted(snapshots.iterdir()) if s.is_dir()]
    for path in candidates:
        if (folder and (path / "config.json").is_file()) or (not folder and path.is_file()):
            return path
    return None


def where(models_dir: Path, rel: str) -> str:
    """'put FILE (from the REPO repository) at PATH', or the same for a transformers folder."""
    path = expected_path(models_dir, rel)
    if rel.endswith("/"):
        return f"put the {rel.rstrip('/')} folder ({FOLDER_FILES}, as on the Hugging Face Hub) at {path}"
    repo, _, name = rel.rpartition("/")
    return f"put {name} (from the {repo} repository) at {path}"


def _package_missing(packages: Sequence[str]) -> str | None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''} "
            f"({', '.join(n.replace('_', '-') for n in missing)} in requirements.txt) "
            f"{'are' if len(missing) > 1 else 'is'} not installed")


def unavailable_reason(name: str, annotator: Annotator, models_dir: Path) -> str | None:
    """None when the preprocessor can run, else what to do: every missing file and where it
    goes, or the missing package."""
    missing = [rel for rel in annotator.files if locate(models_dir, rel) is None]
    if missing:
        return f"preprocessor '{name}' needs its annotator network: " + "; ".join(
            where(models_dir, rel) for rel in missing)
    package = _package_missing(annotator.packages)
    if package:
        return f"preprocessor '{name}' found its weights, but {package}: install it to run this preprocessor"
    return None


def run(name: str, annotator: Annotator, image: np.ndarray, threshold_a: float, threshold_b: float,
        models_dir: Path) -> np.ndarray:
    """The map, the size of `image`. Call after `unavailable_reason` said None."""
    paths = [locate(models_dir, rel) for rel in annotator.files]
    try:
        out = annotator.run(image, threshold_a, threshold_b, paths)
    except AnnotatorError:
        raise
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        files = ", ".join(str(p) for p in paths)
        raise AnnotatorError(f"preprocessor '{name}' could not run its network ({files}): "
                             f"{type(exc).__name__}: {text}") from exc
    out = np.asarray(out)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    if out.shape[:2] != image.shape[:2]:
        import cv2

        out = cv2.resize(out, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(out[..., :3], dtype=np.uint8)


# --- controlnet_aux networks with our own weight loading -------------------------------------

def _weights(path: Path) -> dict:
    """A weights-only torch.load (lllyasviel's files are plain state dicts); `module.` prefixes
    of DataParallel checkpoints and a `state_dict` / `model` wrapper are taken off."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the class a file wants ("Unsupported global"); other failures are damage
        if "global" in str(exc).lower():
            raise AnnotatorError(f"{path} needs full unpickling, which can run arbitrary code; refused") from exc
        raise AnnotatorError(f"{path} is not a readable PyTorch file (damaged or not a checkpoint)") from exc
    except Exception as exc:
        raise AnnotatorError(f"{path} is not a readable PyTorch file ({type(exc).__name__})") from exc
    for wrapper in ("state_dict", "model"):  # PiDiNet's file wraps in "state_dict", NormalBae's in "model"
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise AnnotatorError(f"{path} holds no state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _loaded(module, path: Path):
    try:
        module.load_state_dict(_weights(path), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise AnnotatorError(f"{path} does not fit the network this preprocessor runs: {first}") from exc
    return module.float().eval()


def _size(image: np.ndarray) -> int:
    return int(min(image.shape[:2]))


def _aux_call(detector, image: np.ndarray, **kwargs) -> np.ndarray:
    import torch

    with torch.no_grad():
        return detector(image, detect_resolution=_size(image), image_resolution=_size(image), output_type="np",
                        **kwargs)


def _hed(image, _a, _b, paths):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    return _aux_call(HEDdetector(_loaded(ControlNetHED_Apache2(), paths[0])), image, safe=False)


def _pidinet(image, _a, _b, paths):
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet

    return _aux_call(PidiNetDetector(_loaded(pidinet(), paths[0])), image, safe=False)


def _lineart(coarse: bool):
    def run(image, _a, _b, paths):
        from controlnet_aux.lineart import Generator, LineartDetector

        model = _loaded(Generator(3, 1, 3), paths[0])
        return _aux_call(LineartDetector(model, model), image, coarse=coarse)

    return run


def _lineart_anime(image, _a, _b, paths):
    import functools

    from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator
    from torch import nn

    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return _aux_call(LineartAnimeDetector(_loaded(UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False),
                                                  paths[0])), image)


def _mlsd(image, value_threshold, distance_threshold, paths):
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    return _aux_call(MLSDdetector(_loaded(MobileV2_MLSD_Large(), paths[0])), image, thr_v=float(value_threshold),
                     thr_d=float(distance_threshold))


def _openpose(hand: bool, face: bool):
    def run(image, _a, _b, paths):
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.face import Face
        from controlnet_aux.open_pose.hand import Hand

        # Body/Hand/Face read their file with torch.load themselves: only after the weights-only
        # unpickler accepted it (so the full one can meet nothing but tensors and containers).
        files = iter(paths)
        for path in paths:
            _weights(path)
        body = Body(str(next(files)))
        hand_net = Hand(str(next(files))) if hand else None
        face_net = Face(str(next(files))) if face else None
        return _aux_call(OpenposeDetector(body, hand_net, face_net), image, include_body=True, include_hand=hand,
                         include_face=face)

    return run



def _normal_bae(image, _a, _b, paths):
    """Bae et al.'s surface normals (scannet.pt): an EfficientNet-B5 encoder that controlnet_aux
    builds from its vendored code with pretrained=False, so all weights come from the file."""
    import contextlib
    import io
    import types

    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    # the settings the scannet checkpoint was trained with (BatchNorm decoder)
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    with contextlib.redirect_stdout(io.StringIO()):  # the encoder prints its progress
        network = NNET(args)
    return _aux_call(NormalBaeDetector(_loaded(network, paths[0])), image)

# --- transformers networks -------------------------------------------------------------------

def _pixels(image: np.ndarray, folder: Path, multiple: int):
    """A 1x3xHxW float tensor, sides rounded to `multiple`, normalised with the folder's
    preprocessor_config.json statistics (ImageNet's without one)."""
    import cv2
    import torch

    mean, std = _IMAGENET
    config = folder / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text(encoding="utf-8"))
        mean, std = values.get("image_mean", mean), values.get("image_std", std)
    h, w = image.shape[:2]
    size = (max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple))
    pixels = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1)).unsqueeze(0)


def _patch_multiple(config) -> int:
    backbone = getattr(config, "backbone_config", None)
    patch = getattr(backbone, "patch_size", None) or getattr(config, "patch_size", None) or 32
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def _depth(far_is_large: bool):
    """Relative depth as the extension shows it: near bright, far dark (MiDaS / Depth Anything
    predict inverse depth; ZoeDepth metric depth, which is flipped)."""
    def run(image, _a, _b, paths):
        import torch
        from transformers import AutoModelForDepthEstimation

        model = AutoModelForDepthEstimation.from_pretrained(paths[0], local_files_only=True).float().eval()
        with torch.no_grad():
            depth = model(pixel_values=_pixels(image, paths[0], _patch_multiple(model.config))).predicted_depth
            depth = torch.nn.functional.interpolate(depth.reshape(1, 1, *depth.shape[-2:]), size=image.shape[:2],
                                                    mode="bicubic", align_corners=False)[0, 0].numpy()
        depth = depth - depth.min()
        peak = float(depth.max())
        depth = depth / peak if peak > 0 else depth  # a flat map stays black
        if far_is_large:
            depth = 1.0 - depth
        return np.round(depth * 255.0).clip(0, 255).astype(np.uint8)

    return run


def _segmentation(image, _a, _b, paths):
    """Classes coloured with the ADE20K palette the segmentation ControlNets were trained on."""
    import torch
    from controlnet_aux.util import ade_palette
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(paths[0], local_files_only=True).float().eval()
    with torch.no_grad():
        logits = model(pixel_values=_pixels(image, paths[0], 32)).logits
        logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    classes = logits.argmax(dim=1)[0].numpy()
    palette = np.asarray(ade_palette(), dtype=np.uint8)
    return palette[classes % len(palette)]


AUX = ("controlnet_aux", "torchvision")  # controlnet_aux imports torchvision-based detectors
TRANSFORMERS = ("transformers",)


def _aux(*names: str) -> tuple[str, ...]:
    return tuple(f"{AUX_REPO}/{name}" for name in names)


ANNOTATORS = MappingProxyType({
    "lineart_realistic": Annotator(_aux("sk_model.pth"), AUX, _lineart(coarse=False)),
    "lineart_coarse": Annotator(_aux("sk_model2.pth"), AUX, _lineart(coarse=True)),
    "lineart_anime": Annotator(_aux("netG.pth"), AUX, _lineart_anime),
    "softedge_hed": Annotator(_aux("ControlNetHED.pth"), AUX, _hed),
    "softedge_pidinet": Annotator(_aux("table5_pidinet.pth"), AUX, _pidinet),
    "depth_midas": Annotator(("Intel/dpt-hybrid-midas/",), TRANSFORMERS, _depth(far_is_large=False)),
    "depth_zoe": Annotator(("Intel/zoedepth-nyu-kitti/",), TRANSFORMERS, _depth(far_is_large=True)),
    "depth_anything": Annotator(("LiheYoung/depth-anything-large-hf/",), TRANSFORMERS, _depth(far_is_large=False)),
    "openpose": Annotator(_aux("body_pose_model.pth"), AUX, _openpose(hand=False, face=False)),
    "openpose_hand": Annotator(_aux("body_pose_model.pth", "hand_pose_model.pth"), AUX,
                               _openpose(hand=True, face=False)),
    "openpose_face": Annotator(_aux("body_pose_model.pth", "facenet.pth"), AUX,
                               _openpose(hand=False, face=True)),
    "openpose_full": Annotator(_aux("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"), AUX,
                               _openpose(hand=True, face=True)),
    "mlsd": Annotator(_aux("mlsd_large_512_fp32.pth"), AUX, _mlsd),
    "normal_bae": Annotator(_aux("scannet.pt"), AUX, _normal_bae),
    # UperNet (ConvNeXt) for the extension's UniFormer-UperNet ADE20K map; both colour ADE20K classes.
    "seg_ufade20k": Annotator(("openmmlab/upernet-convnext-small/",), TRANSFORMERS + AUX, _segmentation),
})
