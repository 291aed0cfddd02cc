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
from tests import factories, lora_factory
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
    lora_factory.write_tiny_kohya_lora(lora / "locon.safetensors", seed=11, scale=0.5,
                                       modules=lora_factory.TINYWORLD_CONV_MODULES)
    lora_factory.write_tiny_lycoris(lora / "loha.safetensors", "loha", seed=12)
    lora_factory.write_tiny_lycoris(lora / "lokr.safetensors", "lokr", seed=13,
                                    full_w2=("unet:down_blocks.0.attentions.0.proj_in",
                                             "unet:down_blocks.1.resnets.0.conv2"))
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
    from api.mapping import info_dict
    from api.models import Txt2ImgRequest
    from ui.generation import generation_info

    manager, _ = engine
    assert np.array_equal(_image(manager, [LoraRequest("partial", 0.8, 0.8)]),
                          _image(manager, [LoraRequest("style-a", 0.8, 0.8)]))
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        reports = list(manager.loras.reports(active.pipe.unet).values())
    assert any("partial.safetensors" in r and "68 of 69 layers" in r for r in reports)
    # the user sees it: on the result, in the UI's generation info and in the API's info
    request = GenerationRequest(prompt="a red square <lora:partial:0.8>", checkpoint="tiny.safetensors",
                                width=64, height=64, steps=1, seed=3, save_images=False)
    result = generate(manager, None, request)
    assert len(result.warnings) == 1 and "only 68 of 69 layers" in result.warnings[0]
    assert generation_info(request, result)["warnings"] == result.warnings
    assert info_dict(Txt2ImgRequest(prompt=request.prompt), request, result)["warnings"] == result.warnings
    clean = generate(manager, None, request.with_changes(prompt="a red square <lora:style-a:0.8>"))
    assert clean.warnings == []


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


# --- LoCon, LoHa, LoKr -------------------------------------------------------------------------

def _base_weights(pipe) -> dict:
    """The checkpoint's own weights of the UNet and text encoder, whatever PEFT wrapped them in."""
    weights = {}
    for component in ("unet", "text_encoder"):
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in key:
                weights[f"{component}.{key.replace('.base_layer', '')}"] = value.clone()
    return weights


def _layer(model, dotted: str):
    try:
        module = model.get_submodule(dotted)
    except AttributeError:  # transformers 5's CLIPTextModel has no `text_model.` level
        module = model.get_submodule(dotted.removeprefix("text_model."))
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def test_locon_conv_layers_load_and_change_the_image(engine):
    manager, _ = engine
    base = _image(manager)
    locon = _image(manager, [LoraRequest("locon", 1.0, 1.0)])
    assert np.abs(locon - base).max() > 4  # only convolution layers in this file
    with manager.pipeline("txt2img", "tiny.safetensors", loras=(LoraRequest("locon"),)) as active:
        adapter = active.loras[0].adapter
        for module in lora_factory.TINYWORLD_CONV_MODULES:
            layer = active.pipe.unet.get_submodule(module.split(":", 1)[1])
            assert adapter in layer.lora_A and type(layer.get_base_layer()).__name__ == "Conv2d", module
        assert active.loras[0].report == ""  # every layer of it matched
    assert np.array_equal(_image(manager, [LoraRequest("locon", 0.0, 0.0)]), base)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_loha_and_lokr_apply_their_weight_update_and_unload_exactly(lora_root, tmp_path, name):
    """The image equals the base model with dW (computed here the A1111 way) added to each
    layer's weight; weight 0 is the base; fused and unloaded, the base weights are bit-exact."""
    import torch
    from safetensors.torch import load_file

    manager, _ = make_engine(lora_root, tmp_path)
    manager.loras.max_resident = 1
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        original = _base_weights(active.pipe)
    base = _image(manager)
    applied = _image(manager, [LoraRequest(name, 1.0, 1.0)])
    assert np.abs(applied - base).max() > 4
    with manager.pipeline("txt2img", "tiny.safetensors", loras=(LoraRequest(name),)) as active:
        assert active.loras[0].report == ""  # every layer placed: text encoder and convolutions too
    assert np.array_equal(_image(manager, [LoraRequest(name, 0.0, 0.0)]), base)

    tensors = load_file(str(lora_root / "models" / "Lora" / f"{name}.safetensors"))
    with manager.pipeline("txt2img", "tiny.safetensors") as active:  # no LoRA selected: layers off
        patched = []
        with torch.no_grad():
            for module in lora_factory.TINYWORLD_LYCORIS_MODULES:
                part, dotted = module.split(":", 1)
                model = active.pipe.unet if part == "unet" else active.pipe.text_encoder
                weight = _layer(model, dotted).weight
                key = lora_factory._kohya_name(module)
                patched.append((weight, weight.clone()))
                weight += lora_factory.lycoris_delta(tensors, key, tuple(weight.shape))
            try:
                from pipelines.generate import _run_batch
                from pipelines.jobs import CancelToken

                request = GenerationRequest(prompt="a red square", checkpoint="tiny.safetensors", width=64,
                                            height=64, steps=2, seed=7, save_images=False)
                reference = np.asarray(_run_batch(active, request, [7], 0, lambda _p: None, CancelToken())[0]).astype(int)
            finally:
                for weight, saved in patched:
                    weight.copy_(saved)
    assert np.abs(applied - reference).max() <= 2

    manager.loras.fuse = True
    fused = _image(manager, [LoraRequest(name, 1.0, 1.0)])
    manager.loras.fuse = False
    assert np.abs(fused - applied).max() <= 2
    _image(manager, [LoraRequest("style-a", 1.0, 1.0)])  # max_resident 1: evicts the LyCORIS file
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        assert manager.loras.resident_names(active.pipe.unet) == ["style-a.safetensors"]
        after = _base_weights(active.pipe)
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)
    assert np.array_equal(_image(manager), base)


def test_lycoris_with_cp_decomposition_is_refused_by_name(lora_root, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_root / "models" / "Lora" / "loha.safetensors"))
    key = lora_factory._kohya_name("unet:down_blocks.1.resnets.0.conv1")
    tensors[f"{key}.hada_t1"] = torch.zeros(2, 2, 3, 3)
    save_file(tensors, str(lora_root / "models" / "Lora" / "loha-cp.safetensors"))
    manager, _ = make_engine(lora_root, tmp_path)
    try:
        with pytest.raises(ValueError, match=r"loha-cp.safetensors is a LyCORIS LoHa with CP decomposition"):
            _image(manager, [LoraRequest("loha-cp")])
    finally:
        (lora_root / "models" / "Lora" / "loha-cp.safetensors").unlink()


# --- order, switching with eviction, settings ------------------------------------------------------

def test_fresh_engines_loading_two_loras_in_either_order_give_the_same_image(lora_root, tmp_path):
    """Adapters injected b-then-a and a-then-b: the selection, not the load order, decides."""
    images = []
    for i, order in enumerate((("style-b", "style-a"), ("style-a", "style-b"))):
        manager, _ = make_engine(lora_root, tmp_path / str(i))
        for name in order:  # one request each: the adapters enter the model in this order
            _image(manager, [LoraRequest(name, 1.0, 1.0)])
        weights = {"style-a": 0.7, "style-b": 0.4}
        images.append(_image(manager, [LoraRequest(n, weights[n], weights[n]) for n in order]))
        with manager.pipeline("txt2img", "tiny.safetensors") as active:
            assert len(manager.loras.resident(active.pipe.unet)) == 2
    assert np.array_equal(images[0], images[1])


def _peft_census(pipe) -> tuple[int, int]:
    """(LoRA-wrapped layers, LoRA parameters) over the UNet and text encoder."""
    from peft.tuners.lora import LoraLayer

    layers = params = 0
    for component in ("unet", "text_encoder"):
        for module in getattr(pipe, component).modules():
            if isinstance(module, LoraLayer):
                layers += 1
                params += sum(p.numel() for d in (module.lora_A, module.lora_B) for p in d.parameters())
    return layers, params


def test_a_hundred_switches_that_evict_and_reload_keep_memory_and_layers_flat(tmp_path):
    root = tmp_path / "models-root"
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    names = ["small-a", "small-b", "small-c"]
    for seed, name in enumerate(names):  # 7 layers each: the reloads stay cheap
        lora_factory.write_tiny_kohya_lora(root / "models" / "Lora" / f"{name}.safetensors", seed=seed)
    (root / "embeddings").mkdir()
    manager, _ = make_engine(root, tmp_path / "data")
    manager.loras.max_resident = 2
    _image(manager, [LoraRequest("small-a")])
    checkpoint_loads, lora_loads = manager.load_counts["checkpoint"], manager.load_counts["lora"]
    process = psutil.Process(os.getpid())
    first = census = None
    for i in range(100):
        with manager.pipeline("txt2img", "tiny.safetensors", loras=(LoraRequest(names[(i + 1) % 3], 0.8),)) as active:
            now = _peft_census(active.pipe)
            resident = manager.loras.resident(active.pipe.unet)
        assert len(resident) == 2
        if first is None:
            first, census = process.memory_info().rss, now
        assert now == census, f"switch {i}: PEFT layers/params {now} != {census}"
    assert process.memory_info().rss <= first * 1.05
    assert manager.load_counts["lora"] - lora_loads == 100  # a, b, c round a cache of two: each switch reloads
    assert manager.load_counts["checkpoint"] == checkpoint_loads


def test_lora_cache_size_and_fuse_are_settings(tmp_path):
    import app
    from pipelines.settings import Settings

    settings = Settings.from_sources(["--data-dir", str(tmp_path), "--lora-max-resident", "3", "--lora-fuse"], environ={})
    assert (settings.lora_max_resident, settings.lora_fuse) == (3, True)
    assert Settings.from_sources(["--data-dir", str(tmp_path)], environ={"EASEL_LORA_MAX_RESIDENT": "5"}).lora_max_resident == 5
    with pytest.raises(ValueError, match="lora_max_resident"):
        Settings(data_dir=tmp_path, lora_max_resident=0)
    ctx = app.build_context(settings)
    assert (ctx.manager.loras.max_resident, ctx.manager.loras.fuse) == (3, True)


# --- pasting infotext: renamed files found by their hashes ------------------------------------------

def test_pasted_infotext_finds_a_renamed_lora_and_embedding_by_hash(tmp_path):
    import torch
    from PIL import PngImagePlugin
    from safetensors.torch import save_file

    from pipelines.metadata import parse_infotext
    from ui.png_info import image_info

    root = tmp_path / "models-root"
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    factories.write_tiny_lora(root / "models" / "Lora" / "old-style.safetensors", seed=4)
    factories.write_tiny_lora(root / "models" / "Lora" / "other.safetensors", seed=5)
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(8)) * 0.5},
              str(root / "embeddings" / "oldword.safetensors"))
    manager, _ = make_engine(root, tmp_path / "data")
    request = GenerationRequest(prompt="a red square oldword <lora:old-style:0.8>", negative_prompt="oldword",
                                checkpoint="tiny.safetensors", width=64, height=64, steps=2, seed=5, save_images=False)
    result = generate(manager, None, request)
    original, text = np.asarray(result.images[0]).astype(int), result.infotexts[0]

    (root / "models" / "Lora" / "old-style.safetensors").rename(root / "models" / "Lora" / "new-style.safetensors")
    (root / "embeddings" / "oldword.safetensors").rename(root / "embeddings" / "newword.safetensors")
    manager.registry.refresh()
    png = tmp_path / "pasted.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    result.images[0].save(png, pnginfo=info)
    _, parsed = image_info(str(png), registry=manager.registry)
    assert parsed["Prompt"] == "a red square newword <lora:new-style:0.8>"
    assert parsed["Negative prompt"] == "newword"
    assert parse_infotext(text)["Prompt"] == request.prompt  # without the registry: as written
    again = generate(manager, None, request.with_changes(prompt=parsed["Prompt"],
                                                         negative_prompt=parsed["Negative prompt"]))
    assert np.array_equal(np.asarray(again.images[0]).astype(int), original)
