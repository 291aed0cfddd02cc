"""The trainer's text encoder: its starting construction ("word w at position i") and the
caption-meaning targets it is trained towards (tools/tinyworld/text_encoder.py)."""
import pytest
import torch

from pipelines.configs import load_tokenizer
from tools.tinyworld import world
from tools.tinyworld.text_encoder import (
    BG_POSITION, CAPTION_END, FG_POSITION, MAX_TOKENS, SHAPE_POSITION, MeaningSpace, build_text_encoder,
    caption_targets, random_prompt, tokenize)
from tools.tinyworld.train import CONFIG_DIR

TEXT_CONFIG = CONFIG_DIR / "text_encoder"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return build_text_encoder(tokenizer, seed=0, config_dir=TEXT_CONFIG)


def _word_rows(tokenizer, encoder):
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in world.VOCABULARY]
    return encoder.get_input_embeddings().weight[ids]


def test_world_words_get_orthogonal_embeddings_in_the_first_half(tokenizer, encoder):
    rows = _word_rows(tokenizer, encoder)
    half = rows.shape[1] // 2
    assert torch.count_nonzero(rows[:, half:]) == 0
    gram = rows[:, :half] @ rows[:, :half].T
    assert torch.allclose(gram, torch.eye(len(rows)) * half, atol=1e-3)


def test_positions_are_orthogonal_in_the_second_half(encoder):
    core = getattr(encoder, "text_model", encoder)
    positions = core.embeddings.position_embedding.weight
    half = positions.shape[1] // 2
    assert torch.count_nonzero(positions[:, :half]) == 0
    first = positions[:half, half:]
    assert torch.allclose(first @ first.T, torch.eye(half) * half, atol=1e-3)


def test_caption_positions_are_where_the_targets_put_them(tokenizer):
    ids = tokenize(tokenizer, ["a red circle on a blue background"])[0].tolist()
    words = [tokenizer.convert_ids_to_tokens(i) for i in ids[:CAPTION_END + 2]]
    assert words[FG_POSITION] == "red</w>" and words[SHAPE_POSITION] == "circle</w>"
    assert words[BG_POSITION] == "blue</w>" and words[CAPTION_END] == "background</w>"
    assert words[CAPTION_END + 1] == tokenizer.eos_token


def test_meaning_directions_are_orthogonal_and_layer_norm_sized():
    space = MeaningSpace.make(hidden=64, seed=0)
    rows = torch.stack([*space.fg.values(), *space.shape.values(), *space.bg.values(), space.filler, space.nothing])
    assert torch.allclose(rows @ rows.T, torch.eye(len(rows)) * 64, atol=1e-3)
    with pytest.raises(ValueError, match="do not fit"):
        MeaningSpace.make(hidden=8, seed=0)


def test_targets_put_each_part_in_its_place_and_the_meaning_after_the_caption():
    space = MeaningSpace.make(hidden=64, seed=0)
    targets = caption_targets(space, ("red", "circle", "blue"))
    assert targets.shape == (MAX_TOKENS, 64)
    assert torch.equal(targets[FG_POSITION], space.fg["red"])
    assert torch.equal(targets[SHAPE_POSITION], space.shape["circle"])
    assert torch.equal(targets[BG_POSITION], space.bg["blue"])
    summary = space.summary("red", "circle", "blue")
    assert all(torch.equal(row, summary) for row in targets[CAPTION_END:])
    # foreground and background colours are told apart: the same colour in two subspaces
    assert float(space.summary("red", "circle", "blue") @ space.summary("blue", "circle", "red")) == pytest.approx(
        64 / 3, abs=1e-3)
    empty = caption_targets(space, None)
    assert torch.equal(empty[0], space.filler) and all(torch.equal(row, space.nothing) for row in empty[1:])


def test_training_prompts_mix_captions_extra_words_and_empty():
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng) for _ in range(400)]
    captions = [p for p, combo in prompts if combo is not None]
    assert all(p.startswith(world.caption(*combo)) for p, combo in prompts if combo is not None)
    assert 0.6 < len(captions) / len(prompts) < 0.8
    assert any(", " in p for p in captions) and ("", None) in prompts
