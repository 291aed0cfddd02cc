"""The tiny-world generator and its ground-truth classifier: tests of other features lean on both."""
import numpy as np
import pytest
from PIL import ImageFilter

from tools.tinyworld import world


def _score(images_and_truth):
    correct = {"bg": 0, "fg": 0, "shape": 0}
    for image, (fg, shape, bg) in images_and_truth:
        result = world.classify(image)
        correct["bg"] += result.bg == bg
        correct["fg"] += result.fg == fg
        correct["shape"] += result.shape == shape
    return correct


def _rendered(per_combo, seed):
    rng = np.random.default_rng(seed)
    return [
        (world.render(fg, shape, bg, rng), (fg, shape, bg))
        for _ in range(per_combo)
        for fg, shape, bg in world.all_combinations()
    ]


def test_vocabulary_covers_the_required_words():
    assert {"red", "green", "blue", "yellow", "white", "black"} <= set(world.COLOURS)
    assert set(world.SHAPES) == {"circle", "square", "triangle"}
    assert len(world.all_combinations()) == len(world.COLOURS) * (len(world.COLOURS) - 1) * 3


def test_caption_round_trips_for_every_combination():
    for fg, shape, bg in world.all_combinations():
        text = world.caption(fg, shape, bg)
        assert text == f"a {fg} {shape} on a {bg} background"
        assert world.parse_caption(text) == (fg, shape, bg)
    assert world.parse_caption("  A Red Circle on a Blue Background ") == ("red", "circle", "blue")


@pytest.mark.parametrize(
    "bad", ["a red circle", "a purple circle on a blue background", "a red circle on a red background"]
)
def test_parse_caption_rejects_what_is_not_a_caption(bad):
    with pytest.raises(ValueError):
        world.parse_caption(bad)


def test_render_rejects_equal_colours_and_unknown_words():
    with pytest.raises(ValueError, match="both"):
        world.render("red", "circle", "red", 0)
    with pytest.raises(ValueError, match="shape"):
        world.render("red", "hexagon", "blue", 0)


def test_render_is_deterministic_per_seed_and_varies_across_seeds():
    a = np.asarray(world.render("red", "circle", "blue", 7))
    b = np.asarray(world.render("red", "circle", "blue", 7))
    c = np.asarray(world.render("red", "circle", "blue", 8))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Flat colours only: the background and the shape's palette entries.
    colours = {tuple(p) for p in a.reshape(-1, 3)}
    assert colours == {world.PALETTE["red"], world.PALETTE["blue"]}
    # The border is pure background, which is what the classifier reads.
    assert (a[0] == world.PALETTE["blue"]).all() and (a[:, -1] == world.PALETTE["blue"]).all()


def test_sample_dataset_is_reproducible_and_covers_the_world():
    first = world.sample_dataset(300, seed=3)
    second = world.sample_dataset(300, seed=3)
    assert [s.caption for s in first] == [s.caption for s in second]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(first[:20], second[:20]))
    assert {s.fg for s in first} == set(world.COLOURS)
    assert {s.shape for s in first} == set(world.SHAPES)
    assert all(s.fg != s.bg for s in first)


def test_classifier_is_exact_on_clean_renders_of_every_combination():
    images = _rendered(per_combo=7, seed=0)  # 630 images, every combination 7 times
    assert _score(images) == {"bg": 630, "fg": 630, "shape": 630}


def test_classifier_survives_noise_and_blur():
    rng = np.random.default_rng(1)
    clean = _rendered(per_combo=3, seed=2)  # 270 images
    noisy = [
        (np.clip(np.asarray(img, np.float32) + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8), truth)
        for img, truth in clean
    ]
    blurred = [(img.filter(ImageFilter.GaussianBlur(1.5)), truth) for img, truth in clean]
    for variant in (noisy, blurred):
        score = _score(variant)
        assert score["bg"] == 270 and score["fg"] == 270
        assert score["shape"] >= 0.95 * 270


def test_classifier_reports_no_shape_on_a_blank_image():
    blank = np.zeros((64, 64, 3), np.uint8) + np.array(world.PALETTE["green"], np.uint8)
    assert world.classify(blank) == world.Classification(bg="green", fg=None, shape=None)


def test_classifier_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB"):
        world.classify(np.zeros((64, 64), np.uint8))
