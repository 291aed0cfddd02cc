"""The trainer's constructed text encoder: each output position says "word w at position i",
which is what made tiny-world's prompt adherence learnable on a CPU."""
import pytest
import torch

from pipelines.configs import load_tokenizer
from tools.tinyworld import world
from tools.tinyworld.train import build_text_encoder, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return build_text_encoder(tokenizer, seed=0)


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


@torch.no_grad()
def test_changing_one_word_changes_mostly_its_own_position(tokenizer, encoder):
    ids = tokenize(tokenizer, ["a red circle on a blue background", "a red square on a blue background"])
    out = encoder(ids).last_hidden_state
    change = (out[0] - out[1]).norm(dim=-1)
    shape_position = 3  # BOS, a, red, circle
    assert change.argmax().item() == shape_position
    assert change[shape_position] > 5 * change[torch.arange(len(change)) != shape_position].max()


@torch.no_grad()
def test_same_seed_same_weights_other_seed_other_weights(tokenizer, encoder):
    again = build_text_encoder(tokenizer, seed=0)
    other = build_text_encoder(tokenizer, seed=1)
    ids = tokenize(tokenizer, ["a green triangle on a black background"])
    assert torch.equal(encoder(ids).last_hidden_state, again(ids).last_hidden_state)
    assert not torch.allclose(encoder(ids).last_hidden_state, other(ids).last_hidden_state)


def test_a_word_that_is_not_one_clip_token_is_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(world, "VOCABULARY", world.VOCABULARY + ("rhombicuboctahedron",))
    with pytest.raises(ValueError, match="not one CLIP token"):
        build_text_encoder(tokenizer, seed=0)
