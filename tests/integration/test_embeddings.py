"""Textual inversion by name: A1111 .pt / .safetensors and diffusers .bin files change the image
where the prompt uses them, and leave the checkpoint exactly as it was afterwards."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.generate import generate
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti-models")
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    folder = root / "embeddings"
    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(2, 64, generator=generator) * 0.5
    save_file({"emb_params": vectors}, str(folder / "glowy.safetensors"))
    torch.save({"string_to_param": {"*": vectors}, "name": "glowy", "step": 100}, folder / "glowpt.pt")
    torch.save({"<glowbin>": vectors[0]}, folder / "glowbin.bin")
    save_file({"clip_l": vectors.clone(), "clip_g": vectors.clone()}, str(folder / "sdxl-only.safetensors"))
    factories.write_tiny_sdxl_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sdxl", seed=0)
    pair = torch.randn(3, 32, generator=generator)
    save_file({"clip_l": pair, "clip_g": -pair}, str(folder / "xlpair.safetensors"))
    manager, _ = make_engine(root, tmp_path_factory.mktemp("data"))
    return manager, folder


def _run(manager, prompt, negative="", checkpoint="tiny.safetensors"):
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, checkpoint=checkpoint,
                                width=64, height=64, steps=2, seed=5, save_images=False)
    result = generate(manager, None, request)
    return np.asarray(result.images[0]).astype(int), result.infotexts[0]


def test_embedding_by_name_changes_the_image_and_leaves_no_trace(engine):
    manager, folder = engine
    base, base_text = _run(manager, "a red square")
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        vocab = len(active.pipe.tokenizer)
        table = active.pipe.text_encoder.get_input_embeddings().weight.clone()
    with_word, text = _run(manager, "a red square glowy")
    assert "TI hashes" not in base_text
    assert f"TI hashes: \"glowy: {manager.registry.sha256(manager.registry.find('embedding', 'glowy'))[:12]}\"" in text
    # the same words without the embedding: remove the file, the word is plain text again
    (folder / "glowy.safetensors").rename(folder / "glowy.off")
    manager.registry.refresh()
    try:
        as_text, _ = _run(manager, "a red square glowy")
    finally:
        (folder / "glowy.off").rename(folder / "glowy.safetensors")
        manager.registry.refresh()
    assert np.abs(with_word - as_text).max() > 4
    again, _ = _run(manager, "a red square")
    assert np.array_equal(again, base)
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        assert len(active.pipe.tokenizer) == vocab
        assert torch.equal(active.pipe.text_encoder.get_input_embeddings().weight, table)


def test_a1111_pt_and_diffusers_bin_formats_load_and_give_the_same_vectors(engine):
    manager, folder = engine
    base, _ = _run(manager, "a red square")
    safetensors_image, _ = _run(manager, "a red square", negative="glowy")
    pt_image, text = _run(manager, "a red square", negative="glowpt")
    assert np.array_equal(safetensors_image, pt_image)
    assert "glowpt: " in text
    assert np.abs(pt_image - base).max() > 4  # the negative-prompt embedding acts
    bin_image, text = _run(manager, "a red square glowbin")
    assert "glowbin: " in text
    assert np.abs(bin_image - base).max() > 4
    # and it is the files' vectors that act, not the extra words: without the files they are plain text
    moved = {folder / "glowbin.bin": folder / "glowbin.off", folder / "glowpt.pt": folder / "glowpt.off"}
    for path, away in moved.items():
        path.rename(away)
    manager.registry.refresh()
    try:
        bin_as_text, _ = _run(manager, "a red square glowbin")
        pt_as_text, _ = _run(manager, "a red square", negative="glowpt")
    finally:
        for path, away in moved.items():
            away.rename(path)
        manager.registry.refresh()
    assert np.abs(bin_image - bin_as_text).max() > 4
    assert np.abs(pt_image - pt_as_text).max() > 4
    assert np.array_equal(_run(manager, "a red square")[0], base)  # words removed: the base exactly


def test_an_embedding_for_another_model_stays_plain_text(engine):
    manager, _ = engine
    _, text = _run(manager, "a red square sdxl-only")
    assert "TI hashes" not in text


def test_sdxl_embedding_loads_into_both_text_encoders(engine):
    from pipelines.adapters.embeddings import scoped_embeddings
    from safetensors.torch import load_file

    manager, folder = engine
    base, _ = _run(manager, "a red square", checkpoint="tiny-sdxl")
    with manager.pipeline("txt2img", "tiny-sdxl") as active:
        sizes = (len(active.pipe.tokenizer), len(active.pipe.tokenizer_2))
    image, text = _run(manager, "a red square xlpair", checkpoint="tiny-sdxl")
    assert "xlpair: " in text
    assert np.abs(image - base).max() > 4
    # clip_l rows in the first text encoder, clip_g rows in the second (the file has clip_g = -clip_l,
    # so a swap fails here)
    pair = load_file(str(folder / "xlpair.safetensors"))
    with manager.pipeline("txt2img", "tiny-sdxl") as active:
        pipe = active.pipe
        with scoped_embeddings(pipe, [manager.registry.find("embedding", "xlpair")]) as used:
            assert [e.stem for e in used] == ["xlpair"]
            for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                            (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
                ids = tokenizer.convert_tokens_to_ids(["xlpair", "xlpair_1", "xlpair_2"])
                assert len(set(ids)) == 3 and min(ids) >= sizes[0 if key == "clip_l" else 1]
                rows = encoder.get_input_embeddings().weight[ids]
                assert torch.allclose(rows, pair[key].to(rows.dtype)), key
    assert np.array_equal(_run(manager, "a red square", checkpoint="tiny-sdxl")[0], base)
    with manager.pipeline("txt2img", "tiny-sdxl") as active:
        assert (len(active.pipe.tokenizer), len(active.pipe.tokenizer_2)) == sizes
        assert active.pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == sizes[1]
