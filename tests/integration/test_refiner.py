"""SDXL refiner on tiny random SDXL base + refiner folders: switch at 1.0 is the base alone, an
earlier switch hands the latents to the refiner (loaded once through the manager's cache)."""
import numpy as np
import pytest
import torch

from pipelines.arch import Arch
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
from pipelines.prompts.encoding import EncoderStack, encode_prompt
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine

BASE = dict(prompt="a lighthouse", negative_prompt="fog", width=64, height=64, steps=4, cfg_scale=5, seed=3,
            sampler="Euler", checkpoint="base", save_images=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    ckpts = root / "models" / "Stable-diffusion"
    factories.write_tiny_sdxl_checkpoint(ckpts / "base", seed=0)
    factories.write_tiny_refiner_checkpoint(ckpts / "refiner", seed=1)
    factories.write_tiny_checkpoint(ckpts / "tiny.safetensors", seed=0)
    (root / "embeddings").mkdir()
    manager, _ = make_engine(root, root / "data")
    assert manager.registry.find("checkpoint", "refiner").arch is Arch.SDXL_REFINER
    assert manager.registry.find("checkpoint", "base").arch is Arch.SDXL
    return manager


def pixels(result):
    return np.asarray(result.images[0], dtype=float)


def test_switch_at_one_equals_the_base_alone(engine):
    base = generate(engine, None, GenerationRequest(**BASE))
    switched = generate(engine, None, GenerationRequest(**BASE, refiner_checkpoint="refiner", refiner_switch_at=1.0))
    assert np.array_equal(pixels(base), pixels(switched))
    assert not any(key[0] == "refiner" for key in engine.cache.keys())  # never loaded


def test_refiner_takes_over_at_the_switch(engine):
    base = generate(engine, None, GenerationRequest(**BASE))
    request = GenerationRequest(**BASE, refiner_checkpoint="refiner", refiner_switch_at=0.5)
    refined = generate(engine, None, request)
    assert refined.images[0].size == (64, 64)
    assert np.abs(pixels(refined) - pixels(base)).mean() > 0.5  # the refiner drew the second half
    loads = engine.load_counts["checkpoint"]
    again = generate(engine, None, request)
    assert np.array_equal(pixels(again), pixels(refined))
    assert engine.load_counts["checkpoint"] == loads
    assert sum(1 for key in engine.cache.keys() if key[0] == "refiner") == 1  # cached once
    fields = parse_infotext(refined.infotexts[0])
    assert fields["Refiner"].startswith("refiner [") and str(fields["Refiner switch at"]) == "0.5"


def test_refiner_mistakes_are_refused(engine):
    with pytest.raises(ValueError, match="SDXL refiner"):
        generate(engine, None, GenerationRequest(**BASE, refiner_checkpoint="tiny", refiner_switch_at=0.5))
    with pytest.raises(ValueError, match="SDXL base"):
        generate(engine, None, GenerationRequest(**{**BASE, "checkpoint": "tiny"}, refiner_checkpoint="refiner",
                                                 refiner_switch_at=0.5))
    with pytest.raises(ValueError, match="switch at"):
        GenerationRequest(refiner_checkpoint="refiner", refiner_switch_at=1.5)


# --- the refiner reads the A1111 prompt language ------------------------------------------------

def _refine(engine, prompt, switch=0.5):
    """A refined image and the conditional `encoder_hidden_states` each UNet call got, refiner's
    and base's (the CFG batch is [uncond, cond])."""
    from pipelines import refiner

    with refiner.refiner_pipeline(engine, "refiner") as pipe:
        refiner_unet = pipe.unet
    with engine.pipeline("txt2img", "base") as active:
        base_unet = active.pipe.unet
    seen = {"refiner": [], "base": []}

    def recorder(name):
        return lambda _module, _args, kwargs: seen[name].append(kwargs["encoder_hidden_states"][1:].clone())

    handles = [refiner_unet.register_forward_pre_hook(recorder("refiner"), with_kwargs=True),
               base_unet.register_forward_pre_hook(recorder("base"), with_kwargs=True)]
    try:
        request = GenerationRequest(**{**BASE, "prompt": prompt}, refiner_checkpoint="refiner",
                                    refiner_switch_at=switch)
        result = generate(engine, None, request)
    finally:
        for handle in handles:
            handle.remove()
    return pixels(result), seen


def _long_prompt():
    """A prompt of 90 tokens without commas (so the first chunk is exactly its first 75 tokens),
    and the text of those first 75 tokens."""
    from pipelines.configs import load_tokenizer

    tokenizer = load_tokenizer(pad_with_bang=True)
    words = [f"{colour} {shape}" for colour in ("red", "green", "blue") for shape in ("circle", "square", "star")] * 5
    text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 90
    return text, tokenizer.decode(ids[:75])


def test_refiner_reads_prompt_weights(engine):
    plain, plain_seen = _refine(engine, "a lighthouse")
    neutral, neutral_seen = _refine(engine, "a (lighthouse:1.0)")
    strong, strong_seen = _refine(engine, "a (lighthouse:1.5)")
    assert np.array_equal(neutral, plain)  # parsed: not the words "(lighthouse:1.0)"
    assert all(torch.equal(a, b) for a, b in zip(neutral_seen["refiner"], plain_seen["refiner"]))
    assert not np.array_equal(strong, plain)  # tiny random models: a small but real change
    # the refiner got the weighted encoding of its own OpenCLIP-G encoder
    from pipelines import refiner
    with refiner.refiner_pipeline(engine, "refiner") as pipe:
        expected = encode_prompt(EncoderStack.from_pipe(pipe), "a (lighthouse:1.5)").embeds
    assert len(strong_seen["refiner"]) == 2 and all(torch.equal(s, expected) for s in strong_seen["refiner"])


def test_refiner_is_not_cut_at_77_tokens(engine):
    long, head = _long_prompt()
    long_image, long_seen = _refine(engine, long)
    head_image, head_seen = _refine(engine, head)
    assert np.abs(long_image - head_image).mean() > 0.1
    refined = long_seen["refiner"][0]
    assert refined.shape[1] == 2 * 77  # two chunks reached the refiner's UNet
    assert torch.equal(refined[:, :77], head_seen["refiner"][0])  # chunk 1 = the first 75 tokens


def test_refiner_continues_the_prompt_editing_schedule(engine):
    """A1111's refiner takes over mid-schedule: with 4 steps and the switch at 0.5 the base samples
    steps 1-2 and the refiner 3-4. With A1111's off-by-one (`parser.text_at_step`) `[a:b:0.25]`
    is `a` for steps 1-2 and `b` for 3-4, `[a:b:0.5]` is `a` for steps 1-3 and `b` for step 4."""
    _, first = _refine(engine, "a lighthouse")
    _, second = _refine(engine, "a tree")
    _, early = _refine(engine, "[a lighthouse:a tree:0.25]")
    _, half = _refine(engine, "[a lighthouse:a tree:0.5]")
    a_base, a_refiner, b_refiner = first["base"][0], first["refiner"][0], second["refiner"][0]
    assert not torch.equal(a_refiner, b_refiner)
    # the base samples only the head of the schedule: its 2 calls are steps 1-2, not spread over 1-4
    assert len(early["base"]) == 2 and all(torch.equal(c, a_base) for c in early["base"])
    assert len(early["refiner"]) == 2 and all(torch.equal(c, b_refiner) for c in early["refiner"])
    assert all(torch.equal(c, a_base) for c in half["base"])
    assert [torch.equal(c, a_refiner) for c in half["refiner"]] == [True, False]
    assert torch.equal(half["refiner"][1], b_refiner)
