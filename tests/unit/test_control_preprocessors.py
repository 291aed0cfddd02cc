"""Weight-free preprocessors on drawn images, and the missing-annotator message of the others."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.control import annotators, preprocessors


def white_square(size=64, box=(16, 16, 47, 47)) -> Image.Image:
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle(box, fill="white")
    return image


def gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")).astype(int)


def test_canny_of_a_white_square_is_its_outline():
    edges = gray(preprocessors.detect("canny", white_square(), resolution=64))
    on = edges > 0
    assert on[16:48, 15:18].any(axis=1).all() and on[16:48, 46:49].any(axis=1).all()  # left and right sides
    assert on[15:18, 16:48].any(axis=0).all() and on[46:49, 16:48].any(axis=0).all()  # top and bottom
    assert not on[22:42, 22:42].any() and not on[:10].any()  # inside and far outside stay black


def test_none_passes_through_and_invert_inverts():
    image = white_square()
    assert preprocessors.detect("none", image).tobytes() == image.tobytes()
    inverted = gray(preprocessors.detect("invert (from white bg & black line)", image, resolution=64))
    assert inverted[0, 0] == 255 and inverted[32, 32] == 0


def test_threshold_binarises():
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")  # dark top, light bottom
    out = gray(preprocessors.detect("threshold", image, resolution=64, threshold_a=128))
    assert set(np.unique(out)) == {0, 255}
    assert out[:20].max() == 0 and out[-20:].min() == 255
    assert set(np.unique(gray(preprocessors.detect("binary", image, resolution=64)))) == {0, 255}  # Otsu


def test_scribble_draws_lines_at_the_edges_only():
    out = gray(preprocessors.detect("scribble_xdog", white_square(), resolution=64)) > 0
    assert out[10:54, 10:54].any() and not out[28:36, 28:36].any() and not out[:4, :4].any()


def test_blur_tile_and_shuffle():
    image = white_square()
    blurred = gray(preprocessors.detect("blur_gaussian", image, resolution=64, threshold_a=4))
    assert 0 < blurred[16, 16] < 255 and blurred[32, 32] > 200
    tile = preprocessors.detect("tile_resample", image, resolution=64, threshold_a=2)
    assert tile.size == (32, 32)
    shuffled = preprocessors.detect("shuffle", image, resolution=64)
    again = preprocessors.detect("shuffle", image, resolution=64)
    assert shuffled.tobytes() == again.tobytes() != image.tobytes()  # deterministic, and moved


def test_processor_resolution_sets_the_short_side():
    out = preprocessors.detect("canny", Image.new("RGB", (200, 100)), resolution=128)
    assert out.size == (256, 128)


@pytest.mark.parametrize("name", [p.name for p in preprocessors.PREPROCESSORS.values() if p.needs_weights])
def test_weight_needing_preprocessors_say_which_file_goes_where(name, tmp_path):
    preprocessor = preprocessors.get(name)
    expected = preprocessors.annotator_path(preprocessor, tmp_path)
    assert expected.is_relative_to(tmp_path / "annotators")
    with pytest.raises(preprocessors.PreprocessorUnavailable) as error:
        preprocessors.detect(name, white_square(), models_dir=tmp_path)
    assert str(expected) in str(error.value) and "needs its annotator network" in str(error.value)
    # damaged files where they belong: a short error naming them (or the missing package), no download
    network = annotators.ANNOTATORS.get(name)
    for rel in network.files if network else (preprocessor.annotator,):
        path = annotators.expected_path(tmp_path, rel)
        if rel.endswith("/"):
            path.mkdir(parents=True)
            (path / "config.json").write_text("{}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")
    with pytest.raises(ValueError) as error:
        preprocessors.detect(name, white_square(), models_dir=tmp_path)
    message = str(error.value)
    if network is None:
        assert "Easel cannot run this network yet" in message
    else:
        assert "is not installed" in message or "are not installed" in message or str(tmp_path) in message


def test_unknown_preprocessor():
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'sparkle'"):
        preprocessors.get("sparkle")
