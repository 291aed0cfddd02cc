"""LoRA through the manager's adapter stack on tiny random models: weight 0 is the base model
bit for bit, order does not matter, switching never reloads the checkpoint or grows memory,
kohya and PEFT files of one LoRA agree, and a LoRA for another architecture is refused."""
import os
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipelines.adapters.lora_stack import LoraRequest
from pipelines.generate import generate
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-models")
    models = root / "models"
    factories.write_tiny_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0)
    sdxl = factories.write_tiny_sdxl_checkpoint(models / "Stable-diffusion" / "tiny-sdxl", seed=0)
    factories.write_tiny_sdxl_lora(models / "Lora" / "xl-style.safetensors", sdxl, seed=3)
    lora = models / "Lora"
    for seed, name in enumerate(("style-a", "style-b", "style-c")):
        factories.write_tiny_lora(lora / f"{name}.safetensors", seed=seed)
    factories.write_tiny_lora(lora / "style-a-peft.safetensors", seed=0, fmt="peft")
    factories.write_tiny_lora(lora / "sd1-tagged.safetensors", seed=5, metadata={"ss_base_model_version": "sd_v1"})
    factories.write_tiny_lora(lora / "untagged.safetensors", seed=6, metadata={})
    _write_partly_matching_lora(lora / "partial.safetensors")
    (root / "embeddings").mkdir()
    return root


def _write_partly_matching_lora(path: Path) -> None:
    """style-a plus one layer no tiny-world model has (down_blocks.7)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(factories.write_tiny_lora(path, seed=0))
    bogus = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors |= {bogus + ".lora_down.weight": torch.zeros(4, 64), bogus + ".lora_up.weight": torch.zeros(64, 4),
                bogus + ".alpha": torch.tensor(2.0)}
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def engine(lora_root, tmp_path_factory):
    return make_engine(lora_root, tmp_path_factory.mktemp("data"))


def _image(manager, loras=(), checkpoint="tiny.safetensors", seed=7):
    request = GenerationRequest(prompt="a red square", checkpoint=checkpoint, width=64, height=64, steps=2,
                                seed=seed, save_images=False)
    with manager.pipeline("txt2img", checkpoint, loras=tuple(loras)) as active:
        from pipelines.generate import _run_batch
        from pipelines.jobs import CancelToken

        images = _run_batch(active, request, [seed], 0, lambda _p: None, CancelToken())
    return np.asarray(images[0]).astype(int)


def test_weight_zero_is_pixel_identical_to_no_lora(engine):
    manager, _ = engine
    base = _image(manager)
    with_lora = _image(manager, [LoraRequest("style-a", 1.0, 1.0)])
    assert np.abs(with_lora - base).max() > 8, "the LoRA must change the image for this test to mean anything"
    zero = _image(manager, [LoraRequest("style-a", 0.0, 0.0)])
    assert np.array_equal(zero, base)
    # and after it was active, a request without LoRA is the base image again
    _image(manager, [LoraRequest("style-a", 1.0, 1.0)])
    assert np.array_equal(_image(manager), base)


def test_separate_text_encoder_and_unet_weights(engine):
    manager, _ = engine
    unet_only = _image(manager, [LoraRequest("style-a", 0.0, 1.0)])
    te_only = _image(manager, [LoraRequest("style-a", 1.0, 0.0)])
    both = _image(manager, [LoraRequest("style-a", 1.0, 1.0)])
    base = _image(manager)
    for image in (unet_only, te_only):
        assert not np.array_equal(image, base) and not np.array_equal(image, both)


def test_two_loras_in_either_order_give_the_same_image(engine):
    manager, _ = engine
    ab = _image(manager, [LoraRequest("style-a", 0.7, 0.7), LoraRequest("style-b", 0.4, 0.4)])
    ba = _image(manager, [LoraRequest("style-b", 0.4, 0.4), LoraRequest("style-a", 0.7, 0.7)])
    assert np.array_equal(ab, ba)
    assert not np.array_equal(ab, _image(manager, [LoraRequest("style-a", 0.7, 0.7)]))


def test_kohya_and_peft_files_of_one_lora_agree(engine):
    manager, _ = engine
    kohya = _image(manager, [LoraRequest("style-a", 0.8, 0.8)])
    peft = _image(manager, [LoraRequest("style-a-peft", 0.8, 0.8)])
    assert np.abs(kohya - peft).max() <= 1


def test_fused_lora_matches_unfused_and_restores_the_base_weights(engine):
    manager, _ = engine
    base = _image(manager)
    applied = _image(manager, [LoraRequest("style-a", 0.8, 0.8)])
    manager.loras.fuse = True
    try:
        fused = _image(manager, [LoraRequest("style-a", 0.8, 0.8)])
    finally:
        manager.loras.fuse = False
    assert np.abs(fused - applied).max() <= 1
    assert np.array_equal(_image(manager), base)


def test_a_hundred_switches_keep_memory_flat_and_never_reload(engine):
    manager, _ = engine
    names = ["style-a", "style-b", "style-c"]
    _image(manager, [LoraRequest(n, 1, 1) for n in names])  # all three resident
    checkpoint_loads = manager.load_counts["checkpoint"]
    lora_loads = manager.load_counts["lora"]
    process = psutil.Process(os.getpid())
    first = None
    for i in range(100):
        request = (LoraRequest(names[i % 3], 0.5 + (i % 5) / 10, 1.0),)
        with manager.pipeline("txt2img", "tiny.safetensors", loras=request) as active:
            assert [a.entry.stem for a in active.loras] == [names[i % 3]]
        if first is None:
            first = process.memory_info().rss
    assert process.memory_info().rss <= first * 1.05
    assert manager.load_counts["checkpoint"] == checkpoint_loads
    assert manager.load_counts["lora"] == lora_loads


def test_resident_loras_are_capped_least_recently_used_first(lora_root, tmp_path):
    manager, _ = make_engine(lora_root, tmp_path)
    manager.loras.max_resident = 2
    first_a = _image(manager, [LoraRequest("style-a", 0.8, 0.8)])
    for name in ("style-b", "style-a", "style-c"):
        with manager.pipeline("txt2img", "tiny.safetensors", loras=(LoraRequest(name),)) as active:
            unet = active.pipe.unet
            adapter = active.loras[0].adapter
    resident = manager.loras.resident(unet)
    assert len(resident) == 2 and resident[-1] == adapter  # b was the least recently used: gone
    assert manager.snapshot()["loras_resident"] == ["style-a.safetensors", "style-c.safetensors"]
    assert manager.load_counts["lora"] == 3
    # loading more adapters next to it never touched style-a's layers
    assert np.array_equal(_image(manager, [LoraRequest("style-a", 0.8, 0.8)]), first_a)
    assert manager.load_counts["lora"] == 3


def test_lora_for_another_architecture_is_refused_and_the_next_request_works(engine):
    manager, _ = engine
    sdxl = _image(manager, checkpoint="tiny-sdxl")
    assert sdxl.shape == (64, 64, 3) and sdxl.std() > 0
    with pytest.raises(ValueError, match=r"made for SD1 .*tiny-sdxl is SDXL"):
        _image(manager, [LoraRequest("sd1-tagged")], checkpoint="tiny-sdxl")
    # no base-model metadata: the keys and shapes decide, and the message names both sides
    with pytest.raises(ValueError, match=r"untagged.*SDXL checkpoint tiny-sdxl"):
        _image(manager, [LoraRequest("untagged")], checkpoint="tiny-sdxl")
    # the failed load left nothing behind: the next request is the same SDXL image
    assert np.array_equal(_image(manager, checkpoint="tiny-sdxl"), sdxl)


def test_partly_matching_lora_is_applied_and_reported(engine):
    manager, _ = engine
    assert np.array_equal(_image(manager, [LoraRequest("partial", 0.8, 0.8)]),
                          _image(manager, [LoraRequest("style-a", 0.8, 0.8)]))
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        reports = list(manager.loras.reports(active.pipe.unet).values())
    assert any("partial.safetensors" in r and "68 of 69 layers" in r for r in reports)


def test_prompt_tags_apply_loras_and_the_infotext_brings_them_back(engine):
    from pipelines.metadata import parse_infotext

    manager, _ = engine

    def run(prompt):
        request = GenerationRequest(prompt=prompt, checkpoint="tiny.safetensors", width=64, height=64, steps=2,
                                    seed=11, save_images=False)
        result = generate(manager, None, request)
        return np.asarray(result.images[0]).astype(int), result.infotexts[0]

    plain, plain_text = run("a red square")
    tagged, text = run("a red square <lora:style-a:0.9> <lora:style-b:0:0.5>")
    assert "Lora hashes" not in plain_text
    assert np.abs(tagged - plain).max() > 8
    parsed = parse_infotext(text)
    hashes = manager.registry.addnet_hash(manager.registry.find("lora", "style-a"))[:12]
    assert parsed["Lora hashes"].startswith(f"style-a: {hashes}, style-b: ")
    again, _ = run(parsed["Prompt"])
    assert np.array_equal(again, tagged)


def test_kohya_sdxl_lora_uses_both_text_encoders_and_the_unet(engine):
    manager, _ = engine
    base = _image(manager, checkpoint="tiny-sdxl")
    assert manager.registry.find("lora", "xl-style").arch.value == "sdxl"
    full = _image(manager, [LoraRequest("xl-style", 1.0, 1.0)], checkpoint="tiny-sdxl")
    te_only = _image(manager, [LoraRequest("xl-style", 1.0, 0.0)], checkpoint="tiny-sdxl")
    assert np.abs(full - base).max() > 4 and not np.array_equal(te_only, base)
    with manager.pipeline("txt2img", "tiny-sdxl", loras=(LoraRequest("xl-style"),)) as active:
        adapter = active.loras[0].adapter
        for component in ("unet", "text_encoder", "text_encoder_2"):
            layers = [m for m in getattr(active.pipe, component).modules() if hasattr(m, "lora_A")]
            assert any(adapter in m.lora_A for m in layers), component
    assert np.array_equal(_image(manager, [LoraRequest("xl-style", 0.0, 0.0)], checkpoint="tiny-sdxl"), base)
    with pytest.raises(ValueError, match=r"made for SDXL .*tiny.safetensors is tiny-world"):
        _image(manager, [LoraRequest("xl-style")])
