"""ControlNet preprocessors ("modules" in the A1111 extension): image -> control map.

The weight-free ones (none, invert, canny, threshold, scribble_xdog, shuffle, tile_resample,
blur_gaussian) are ours, with OpenCV and numpy, and always work. The ones that need annotator
networks (lineart, HED/PiDiNet soft edges, depth, openpose, mlsd, normal_bae, segmentation) run
through annotators.py (controlnet_aux networks, transformers depth/segmentation models) from files
in models/annotators; while a file or package is missing they say exactly which file goes where.
seg_ofade20k is listed with its file but cannot run in Easel yet.

Thresholds follow the extension: -1 means "the preprocessor's default".

Extensions add preprocessors through a `PreprocessorTable` passed in explicitly (the request
carries the app's, `request.additions.preprocessors`); without one only these exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np
from PIL import Image

from pipelines.control import annotators

ANNOTATORS_FOLDER = annotators.ANNOTATORS_FOLDER
_AUX_REPO = "lllyasviel/Annotators"


@dataclass(frozen=True)
class Slider:
    label: str
    default: float
    minimum: float
    maximum: float
    step: float = 1.0


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[[np.ndarray, float, float], np.ndarray] | None  # RGB uint8 HWC -> RGB uint8 HWC
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    annotator: str | None = None  # file it needs, relative to models/annotators/
    aliases: tuple[str, ...] = ()
    source: str = ""  # the extension that added it ("" for Easel's own)

    @property
    def needs_weights(self) -> bool:
        return self.annotator is not None

    def value_a(self, value: float) -> float:
        return self.threshold_a.default if self.threshold_a and value == -1 else value

    def value_b(self, value: float) -> float:
        return self.threshold_b.default if self.threshold_b and value == -1 else value


class PreprocessorUnavailable(ValueError):
    """A preprocessor that needs an annotator network this install cannot run."""


# --- the weight-free ones --------------------------------------------------------------------

def _none(image: np.ndarray, _a: float, _b: float) -> np.ndarray:
    return image


def _invert(image: np.ndarray, _a: float, _b: float) -> np.ndarray:
    return 255 - image  # "invert (from white bg & black line)": black lines on white -> white on black


def _canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    import cv2

    return _rgb(cv2.Canny(image, int(low), int(high)))


def _threshold(image: np.ndarray, level: float, _b: float) -> np.ndarray:
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if level <= 0:  # 0: Otsu picks the level, as the extension's "binary" does
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, int(level), 255, cv2.THRESH_BINARY)
    return _rgb(out)


def _scribble_xdog(image: np.ndarray, threshold: float, _b: float) -> np.ndarray:
    import cv2

    # Difference of Gaussians, strongest (most negative) channel: white strokes on black.
    fine = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 5.0)
    dog = np.min(fine - coarse, axis=2)
    return _rgb(np.where(dog < -threshold, 255, 0).astype(np.uint8))


def _shuffle(image: np.ndarray, _a: float, _b: float) -> np.ndarray:
    import cv2

    # Content shuffle: remap pixels along a smooth random flow. Seeded, so the same image gives
    # the same map (and the same generation) every time.
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    scale = max(h, w) // 8 or 1

    def flow(size: int) -> np.ndarray:
        coarse = rng.random((max(2, h // scale), max(2, w // scale))).astype(np.float32)
        return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * (size - 1)

    return cv2.remap(image, flow(w), flow(h), interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _tile_resample(image: np.ndarray, rate: float, _b: float) -> np.ndarray:
    import cv2

    if rate <= 1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)


def _blur_gaussian(image: np.ndarray, sigma: float, _b: float) -> np.ndarray:
    import cv2

    return image if sigma <= 0 else cv2.GaussianBlur(image, (0, 0), float(sigma))


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _needs(name: str, annotator: str, *aliases: str, a: Slider | None = None,
           b: Slider | None = None) -> Preprocessor:
    """`annotator`: its (first) file; annotators.ANNOTATORS has all it needs and its network."""
    return Preprocessor(name=name, run=None, threshold_a=a, threshold_b=b, annotator=annotator, aliases=aliases)


_ALL = (
    Preprocessor("none", _none),
    Preprocessor("invert", _invert, aliases=("invert (from white bg & black line)",)),
    Preprocessor("canny", _canny, Slider("Canny low threshold", 100, 1, 255),
                 Slider("Canny high threshold", 200, 1, 255)),
    Preprocessor("threshold", _threshold, Slider("Binary threshold (0: automatic)", 0, 0, 255),
                 aliases=("binary", "scribble_threshold")),
    Preprocessor("scribble_xdog", _scribble_xdog, Slider("XDoG threshold", 32, 1, 64), aliases=("scribble",)),
    Preprocessor("shuffle", _shuffle, aliases=("content_shuffle",)),
    Preprocessor("tile_resample", _tile_resample, Slider("Down sampling rate", 1.0, 1.0, 8.0, 0.01),
                 aliases=("tile",)),
    Preprocessor("blur_gaussian", _blur_gaussian, Slider("Sigma", 9.0, 0.01, 64.0, 0.01), aliases=("blur",)),
    _needs("lineart_realistic", f"{_AUX_REPO}/sk_model.pth", "lineart"),
    _needs("lineart_coarse", f"{_AUX_REPO}/sk_model2.pth"),
    _needs("lineart_anime", f"{_AUX_REPO}/netG.pth"),
    _needs("softedge_hed", f"{_AUX_REPO}/ControlNetHED.pth", "hed", "softedge"),
    _needs("softedge_pidinet", f"{_AUX_REPO}/table5_pidinet.pth", "pidinet"),
    _needs("depth_midas", "Intel/dpt-hybrid-midas/", "depth"),
    _needs("depth_zoe", "Intel/zoedepth-nyu-kitti/"),
    _needs("depth_anything", "LiheYoung/depth-anything-large-hf/"),
    _needs("openpose", f"{_AUX_REPO}/body_pose_model.pth"),
    _needs("openpose_hand", f"{_AUX_REPO}/hand_pose_model.pth"),
    _needs("openpose_face", f"{_AUX_REPO}/facenet.pth"),
    _needs("openpose_full", f"{_AUX_REPO}/body_pose_model.pth"),
    _needs("mlsd", f"{_AUX_REPO}/mlsd_large_512_fp32.pth", a=Slider("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01),
           b=Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01)),
    _needs("normal_bae", f"{_AUX_REPO}/scannet.pt", "normal"),
    _needs("seg_ofade20k", f"{_AUX_REPO}/250_16_swin_l_oneformer_ade20k_160k.pth"),
    _needs("seg_ufade20k", "openmmlab/upernet-convnext-small/", "segmentation"),
)

PREPROCESSORS = MappingProxyType({p.name: p for p in _ALL})
_BY_ALIAS = MappingProxyType({alias: p.name for p in _ALL for alias in p.aliases})


# --- added by extensions -----------------------------------------------------------------------

def extension_preprocessor(name: str, fn: Callable[[Image.Image], Any], source: str = "") -> Preprocessor:
    """Wrap an extension's `fn(image: PIL RGB) -> PIL image or HxWx3 uint8 array` as a
    preprocessor (no thresholds). Its errors name it and its extension."""
    key = (name or "").strip().lower()
    if not key:
        raise ValueError("a preprocessor needs a name")
    if key in PREPROCESSORS or key in _BY_ALIAS:
        raise ValueError(f"preprocessor name '{name}' is already Easel's: pick another name")
    origin = f" (extension '{source}')" if source else ""

    def run(image: np.ndarray, _a: float, _b: float) -> np.ndarray:
        try:
            out = fn(Image.fromarray(image, "RGB"))
        except Exception as exc:
            raise ValueError(f"preprocessor '{key}'{origin} failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(out, Image.Image):
            return np.asarray(out.convert("RGB"))
        array = np.asarray(out)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"preprocessor '{key}'{origin} returned {type(out).__name__} {array.shape}, "
                             f"not a PIL image or an HxWx3 array")
        return array

    return Preprocessor(key, run, source=source)


@dataclass(frozen=True)
class PreprocessorTable:
    """Easel's preprocessors plus `extra` ones (see `extension_preprocessor`); names are unique."""
    extra: tuple[Preprocessor, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", tuple(self.extra))
        names_ = [p.name for p in self.extra]
        clash = sorted({n for n in names_ if names_.count(n) > 1 or n in PREPROCESSORS or n in _BY_ALIAS})
        if clash:
            raise ValueError(f"preprocessor name(s) {', '.join(clash)} already taken")

    def find(self, name: str) -> Preprocessor | None:
        key = (name or "").strip().lower()
        return next((p for p in self.extra if p.name == key), None)


def names(table: PreprocessorTable | None = None) -> list[str]:
    """Easel's preprocessor names, then the table's extra ones."""
    return list(PREPROCESSORS) + ([p.name for p in table.extra] if table else [])


def all_preprocessors(table: PreprocessorTable | None = None) -> list[Preprocessor]:
    return list(PREPROCESSORS.values()) + (list(table.extra) if table else [])


def get(name: str, table: PreprocessorTable | None = None) -> Preprocessor:
    key = (name or "none").strip().lower()
    key = _BY_ALIAS.get(key, key)
    if key in PREPROCESSORS:
        return PREPROCESSORS[key]
    extra = table.find(key) if table is not None else None
    if extra is None:
        raise ValueError(f"unknown ControlNet preprocessor '{name}'; use one of: {', '.join(names(table))}")
    return extra


def annotator_path(preprocessor: Preprocessor, models_dir: Path) -> Path | None:
    """Where its (first) annotator file or folder goes."""
    return None if preprocessor.annotator is None else annotators.expected_path(models_dir, preprocessor.annotator)


def unavailable_reason(preprocessor: Preprocessor, models_dir: Path) -> str | None:
    """None when the preprocessor can run, else what to do about it."""
    if preprocessor.annotator is None:
        return None
    network = annotators.ANNOTATORS.get(preprocessor.name)
    if network is not None:
        return annotators.unavailable_reason(preprocessor.name, network, models_dir)
    found = annotators.locate(models_dir, preprocessor.annotator)
    if found is None:
        return (f"preprocessor '{preprocessor.name}' needs its annotator network: "
                f"{annotators.where(models_dir, preprocessor.annotator)}")
    return (f"preprocessor '{preprocessor.name}' found {found}, but Easel cannot run this network yet; "
            "use another preprocessor, or upload a ready-made control map with preprocessor 'none'")


def detect(name: str, image: Image.Image, *, resolution: int = 512, threshold_a: float = -1,
           threshold_b: float = -1, models_dir: Path | None = None,
           table: PreprocessorTable | None = None) -> Image.Image:
    """Run one preprocessor on an image at `resolution` (short side; -1 keeps the size)."""
    preprocessor = get(name, table)
    models_dir = Path(models_dir or "models")
    reason = unavailable_reason(preprocessor, models_dir)
    if reason:
        raise PreprocessorUnavailable(reason)
    source = image.convert("RGB")
    if resolution and resolution > 0 and preprocessor.name != "none":
        source = _short_side(source, int(resolution))
    pixels = np.asarray(source).copy()
    value_a, value_b = preprocessor.value_a(threshold_a), preprocessor.value_b(threshold_b)
    if preprocessor.run is None:
        out = annotators.run(preprocessor.name, annotators.ANNOTATORS[preprocessor.name], pixels, value_a, value_b,
                             models_dir)
    else:
        out = preprocessor.run(pixels, value_a, value_b)
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), "RGB")


def _short_side(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    if scale == 1:
        return image
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    return image.resize((width, height), Image.LANCZOS if scale < 1 else Image.BICUBIC)
