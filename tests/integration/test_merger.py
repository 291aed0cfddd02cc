"""Checkpoint merger: exact endpoints, add difference, baked VAE, LoRA merges equal to applying
the LoRA through diffusers, LoRA+LoRA merges, and the merged file loads through the normal path."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipelines import merger
from pipelines.ldm_convert import VAE_PREFIX
from pipelines.merger import LoraWeight
from tests import factories
from tests.integration.conftest import make_engine
from tests.lora_factory import write_tiny_kohya_lora


def tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    ckpts = root / "models" / "Stable-diffusion"
    factories.write_tiny_checkpoint(ckpts / "A.safetensors", seed=0)
    factories.write_tiny_checkpoint(ckpts / "B.safetensors", seed=1)
    factories.write_tiny_vae(root / "models" / "VAE" / "v.safetensors", seed=2)
    write_tiny_kohya_lora(root / "models" / "Lora" / "l1.safetensors", seed=1)
    write_tiny_kohya_lora(root / "models" / "Lora" / "l2.safetensors", seed=2, rank=2, alpha=1.0)
    (root / "embeddings").mkdir()
    return root


def ckpt(root, name):
    return root / "models" / "Stable-diffusion" / name


def test_weighted_sum_endpoints_equal_a_and_b(root, tmp_path):
    a, b = tensors(ckpt(root, "A.safetensors")), tensors(ckpt(root, "B.safetensors"))
    at0 = tensors(merger.merge_checkpoints(tmp_path / "m0.safetensors", ckpt(root, "A.safetensors"),
                                           ckpt(root, "B.safetensors"), multiplier=0.0))
    at1 = tensors(merger.merge_checkpoints(tmp_path / "m1.safetensors", ckpt(root, "A.safetensors"),
                                           ckpt(root, "B.safetensors"), multiplier=1.0))
    assert sorted(at0) == sorted(a)
    assert all(torch.equal(at0[k], a[k]) for k in a)
    unet_keys = [k for k in a if not k.startswith(VAE_PREFIX)]
    assert all(torch.equal(at1[k], b[k]) for k in unet_keys)
    # the VAE stays A's unless one is baked
    assert all(torch.equal(at1[k], a[k]) for k in a if k.startswith(VAE_PREFIX))
    half = tensors(merger.merge_checkpoints(tmp_path / "mh.safetensors", ckpt(root, "A.safetensors"),
                                            ckpt(root, "B.safetensors"), multiplier=0.5, half=True))
    key = unet_keys[0]
    assert half[key].dtype == torch.float16
    assert torch.allclose(half[key].float(), (a[key] + b[key]) / 2, atol=1e-3)


def test_add_difference_with_b_equal_c_is_a_and_vae_is_baked(root, tmp_path):
    a = tensors(ckpt(root, "A.safetensors"))
    out = merger.merge_checkpoints(tmp_path / "d.safetensors", ckpt(root, "A.safetensors"), ckpt(root, "B.safetensors"),
                                   ckpt(root, "B.safetensors"), method=merger.ADD_DIFFERENCE, multiplier=0.7,
                                   bake_vae=root / "models" / "VAE" / "v.safetensors")
    merged, vae = tensors(out), tensors(root / "models" / "VAE" / "v.safetensors")
    assert all(torch.equal(merged[k], a[k]) for k in a if not k.startswith(VAE_PREFIX))
    assert all(torch.equal(merged[VAE_PREFIX + k], vae[k]) for k in vae)
    info = metadata(out)
    recipe = json.loads(info["sd_merge_recipe"])
    assert recipe["method"] == "add difference" and recipe["vae"] == "v.safetensors"
    assert info["modelspec.architecture"] == "easel/tiny-world-v1" and info["modelspec.title"] == "d"


def test_bad_inputs_are_refused(root, tmp_path):
    folder = root / "models" / "Stable-diffusion"
    for bad in ("../x", "a/b", "..", ".hidden", "", "x\\y"):
        with pytest.raises(ValueError):
            merger.output_path(folder, bad)
    with pytest.raises(ValueError, match="already exists"):
        merger.output_path(folder, "A")
    assert merger.output_path(folder, "new one").parent == folder.resolve()
    with pytest.raises(ValueError, match="model A, B and C|needs models"):
        merger.merge_checkpoints(tmp_path / "x.safetensors", ckpt(root, "A.safetensors"), ckpt(root, "B.safetensors"),
                                 method=merger.ADD_DIFFERENCE)
    with pytest.raises(ValueError, match="not a checkpoint"):
        merger.merge_checkpoints(tmp_path / "x.safetensors", root / "models" / "VAE" / "v.safetensors")


def _image(manager, checkpoint, lora=None, weight=1.0):
    with manager.pipeline("txt2img", checkpoint) as active:
        pipe = active.pipe
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora), adapter_name="test_lora")
            pipe.set_adapters(["test_lora"], [weight])
        try:
            return pipe(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, width=64, height=64,
                        generator=torch.Generator().manual_seed(7), output_type="np").images[0]
        finally:
            if lora is not None:
                pipe.unload_lora_weights()


def test_lora_merged_equals_lora_applied_and_reloads(root, tmp_path):
    lora = root / "models" / "Lora" / "l1.safetensors"
    merger.merge_checkpoints(ckpt(root, "AL.safetensors"), ckpt(root, "A.safetensors"),
                             loras=[LoraWeight(lora, 0.8)])
    manager, _ = make_engine(root, tmp_path)
    base = _image(manager, "A.safetensors")
    applied = _image(manager, "A.safetensors", lora, 0.8)
    merged = _image(manager, "AL.safetensors")  # the normal single-file path
    assert np.abs(applied - base).max() > 0.05, "the test LoRA must change the image"
    assert np.abs(merged - applied).max() < 2e-3
    again = _image(manager, "A.safetensors")
    assert np.array_equal(again, base), "applying the LoRA must leave the base model clean"


def test_lora_plus_lora(root, tmp_path):
    l1, l2 = root / "models" / "Lora" / "l1.safetensors", root / "models" / "Lora" / "l2.safetensors"
    both = [LoraWeight(l1, 1.0), LoraWeight(l2, 0.5)]
    concat = merger.merge_loras(tmp_path / "c.safetensors", both, mode="concat")
    svd_full = merger.merge_loras(tmp_path / "s.safetensors", both, mode="svd", rank=6)
    svd_low = merger.merge_loras(tmp_path / "s2.safetensors", both, mode="svd", rank=2)
    expected = tensors(merger.merge_checkpoints(tmp_path / "e.safetensors", ckpt(root, "A.safetensors"), loras=both))
    for merged, atol in ((concat, 1e-5), (svd_full, 1e-4)):
        got = tensors(merger.merge_checkpoints(tmp_path / f"g{merged.stem}.safetensors", ckpt(root, "A.safetensors"),
                                               loras=[LoraWeight(merged, 1.0)]))
        assert all(torch.allclose(got[k], expected[k], atol=atol) for k in expected)
    low = tensors(svd_low)
    assert {t.shape[0] for k, t in low.items() if k.endswith("lora_down.weight")} == {2}
    assert json.loads(metadata(svd_low)["sd_merge_recipe"])["mode"] == "svd"


def test_merge_from_the_tab_lists_the_new_checkpoint_without_restart(tmp_path):
    import app
    from pipelines.settings import Settings
    from ui import merger_tab

    data = tmp_path / "data"
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "A.safetensors", seed=0)
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "B.safetensors", seed=1)
    write_tiny_kohya_lora(data / "models" / "Lora" / "l1.safetensors", seed=1)
    ctx = app.build_context(Settings(data_dir=data))
    before = [e.name for e in ctx.registry.checkpoints()]
    steps = []
    path = merger_tab.merge_checkpoints_from_values(ctx, {
        "primary": "A.safetensors", "secondary": "B", "multiplier": 0.3, "precision": "fp16",
        "loras": "l1:0.5", "output_name": "AB mix"}, lambda f, d: steps.append(f))
    assert path == (data / "models" / "Stable-diffusion" / "AB mix.safetensors").resolve()
    assert "AB mix.safetensors" in [e.name for e in ctx.registry.checkpoints()]
    assert "AB mix.safetensors" not in before and steps[-1] == 1.0
    recipe = json.loads(metadata(path)["sd_merge_recipe"])
    assert recipe["loras"] == [{"name": "l1.safetensors", "weight": 0.5}] and recipe["multiplier"] == 0.3
    with pytest.raises(ValueError):
        merger_tab.merge_checkpoints_from_values(ctx, {"primary": "A", "output_name": "../../escape"}, lambda f, d: None)
    lora = merger_tab.merge_loras_from_values(ctx, {"loras": "l1:1, l1:0.5", "mode": "svd", "rank": 2,
                                                    "output_name": "twice"}, lambda f, d: None)
    assert lora.parent == (data / "models" / "Lora").resolve()
    assert "twice.safetensors" in [e.name for e in ctx.registry.loras()]


def test_lora_merged_equals_the_lora_tag_in_a_prompt(root, tmp_path):
    """The same LoRA through the adapters lane's path (`<lora:name:w>` in the prompt, applied by
    the engine) and merged into the checkpoint give the same image."""
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    lora = root / "models" / "Lora" / "l1.safetensors"
    merger.merge_checkpoints(ckpt(root, "AL06.safetensors"), ckpt(root, "A.safetensors"),
                             loras=[LoraWeight(lora, 0.6)])
    manager, _ = make_engine(root, tmp_path)
    common = dict(negative_prompt="", width=64, height=64, steps=3, cfg_scale=5, seed=9, sampler="Euler",
                  save_images=False)
    tagged = generate(manager, None, GenerationRequest(prompt="a red circle <lora:l1:0.6>", checkpoint="A",
                                                       **common)).images[0]
    merged = generate(manager, None, GenerationRequest(prompt="a red circle", checkpoint="AL06", **common)).images[0]
    plain = generate(manager, None, GenerationRequest(prompt="a red circle", checkpoint="A", **common)).images[0]
    as_array = lambda image: np.asarray(image, dtype=float)  # noqa: E731
    assert np.abs(as_array(tagged) - as_array(plain)).max() > 10
    assert np.abs(as_array(merged) - as_array(tagged)).max() <= 2


def test_diffusers_folder_and_ckpt_inputs_are_read_under_single_file_keys(root, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.configs import load_tokenizer

    parts = factories.tiny_components(seed=0)
    folder = tmp_path / "A-diffusers"
    StableDiffusionPipeline(**parts, tokenizer=load_tokenizer(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    a = tensors(ckpt(root, "A.safetensors"))  # the same seed written as a single file
    from_folder = tensors(merger.merge_checkpoints(tmp_path / "f.safetensors", folder))
    assert sorted(from_folder) == sorted(a)
    assert all(torch.equal(from_folder[k], a[k]) for k in a)
    assert metadata(tmp_path / "f.safetensors")["modelspec.architecture"] == "easel/tiny-world-v1"

    b = tensors(ckpt(root, "B.safetensors"))
    torch.save({"state_dict": b}, tmp_path / "B.ckpt")
    at1 = tensors(merger.merge_checkpoints(tmp_path / "g.safetensors", folder, tmp_path / "B.ckpt", multiplier=1.0))
    assert all(torch.equal(at1[k], b[k]) for k in b if not k.startswith(VAE_PREFIX))
