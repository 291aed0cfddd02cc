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

    # the Merge button (the handler Gradio runs) updates every checkpoint list, txt2img's hires and
    # refiner lists included; the refiner list takes only SDXL models, so an SDXL merge for it
    from ui.layout import build_ui

    factories.write_tiny_sdxl_checkpoint(data / "models" / "Stable-diffusion" / "XL", seed=0)
    ctx.registry.refresh()
    blocks, reg = build_ui(ctx)
    [button] = [fn for fn in blocks.fns.values() if (reg["merger.run"]._id, "click") in map(tuple, fn.targets)]

    def merge(**values):
        returned = button.fn(**values, progress=lambda *a, **k: None)
        return {block._id: update for block, update in zip(button.outputs, returned, strict=True)}

    def choices(updates, name):
        return [c[0] if isinstance(c, (tuple, list)) else c for c in updates[reg[name]._id]["choices"]]

    updates = merge(primary="A", secondary="B", output_name="AB again")
    for name in ("merger.primary", "checkpoint", "txt2img.hr_checkpoint"):
        assert "AB again.safetensors" in choices(updates, name), name
    assert "AB again.safetensors" not in choices(updates, "txt2img.refiner_checkpoint")  # tiny-world: no refiner
    updates = merge(primary="XL", output_name="XL mix")
    for name in ("merger.primary", "txt2img.hr_checkpoint", "txt2img.refiner_checkpoint"):
        assert "XL mix.safetensors" in choices(updates, name), name


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


def test_streaming_writer_pulls_one_tensor_at_a_time_and_writes_what_save_file_writes(tmp_path):
    import weakref

    from safetensors.torch import save_file

    from pipelines.safetensors_stream import TensorPlan, write_streaming

    generator = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(64, 32, generator=generator), "b.half": torch.randn(7, 3, generator=generator).half(),
             "c.bf16": torch.randn(5, generator=generator).bfloat16(), "d.ids": torch.arange(77, dtype=torch.int64),
             "e.flag": torch.tensor([True, False, True]), "f.scalar": torch.tensor(0.25), "g.empty": torch.zeros(0, 4)}
    live, peak, order = [0], [0], []

    def gone():
        live[0] -= 1

    def produce(plan: TensorPlan) -> torch.Tensor:
        order.append(plan.name)
        tensor = state[plan.name].clone()  # a fresh tensor, freed once the writer lets go of it
        weakref.finalize(tensor, gone)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return tensor

    meta = {"modelspec.title": "t", "sd_merge_recipe": json.dumps({"x": 1})}
    plans = [TensorPlan(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    streamed = write_streaming(tmp_path / "streamed.safetensors", plans, produce, meta)
    assert order == list(state) and peak[0] == 1 and live[0] == 0
    save_file(state, str(tmp_path / "reference.safetensors"), metadata=meta)
    written, reference = tensors(streamed), tensors(tmp_path / "reference.safetensors")
    assert sorted(written) == sorted(reference)
    for key in reference:
        assert written[key].dtype == reference[key].dtype and torch.equal(written[key], reference[key]), key
    assert metadata(streamed) == metadata(tmp_path / "reference.safetensors") == meta
    with pytest.raises(ValueError, match="planned"):
        write_streaming(tmp_path / "bad.safetensors", plans, lambda plan: torch.zeros(1))
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".*partial"))


def test_an_fp16_merge_reloads_and_generates(root, tmp_path):
    out16 = merger.merge_checkpoints(ckpt(root, "AB16.safetensors"), ckpt(root, "A.safetensors"),
                                     ckpt(root, "B.safetensors"), multiplier=0.4, half=True)
    out32 = merger.merge_checkpoints(ckpt(root, "AB32.safetensors"), ckpt(root, "A.safetensors"),
                                     ckpt(root, "B.safetensors"), multiplier=0.4)
    stored = tensors(out16)
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    manager, _ = make_engine(root, tmp_path)
    with manager.pipeline("txt2img", "AB16") as active:  # the normal single-file path
        conv_in = active.pipe.unet.conv_in.weight.detach().clone()
    assert torch.equal(conv_in, stored["model.diffusion_model.input_blocks.0.0.weight"].float())
    half, full, a = _image(manager, "AB16"), _image(manager, "AB32"), _image(manager, "A")
    assert np.abs(half - full).max() < 0.03  # fp16 rounding of the weights only
    assert np.abs(half - a).max() > 0.05  # and it is the merge, not model A


def test_lora_plus_lora_applied_at_1_equals_both_applied_at_1(root, tmp_path):
    """The merged LoRAs go through the engine's LoRA path (`<lora:name:1>` in the prompt), as
    the two sources do: concat is exact, SVD at full rank within float error, low rank close."""
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    lora_dir = root / "models" / "Lora"
    both = [LoraWeight(lora_dir / "l1.safetensors", 1.0), LoraWeight(lora_dir / "l2.safetensors", 1.0)]
    merger.merge_loras(lora_dir / "pair-concat.safetensors", both, mode="concat")
    merger.merge_loras(lora_dir / "pair-svd6.safetensors", both, mode="svd", rank=6)  # 4 + 2: full rank
    merger.merge_loras(lora_dir / "pair-svd1.safetensors", both, mode="svd", rank=1)
    manager, _ = make_engine(root, tmp_path)
    common = dict(negative_prompt="", width=64, height=64, steps=3, cfg_scale=5, seed=9, sampler="Euler",
                  checkpoint="A", save_images=False)

    def image(tags: str) -> np.ndarray:
        result = generate(manager, None, GenerationRequest(prompt="a red circle " + tags, **common))
        return np.asarray(result.images[0], dtype=float)

    plain, sources = image(""), image("<lora:l1:1> <lora:l2:1>")
    concat, svd6, svd1 = image("<lora:pair-concat:1>"), image("<lora:pair-svd6:1>"), image("<lora:pair-svd1:1>")
    assert np.abs(sources - plain).max() > 10, "the test LoRAs must change the image"
    assert np.abs(concat - sources).max() <= 2
    assert np.abs(svd6 - sources).max() <= 2
    # rank 1 of a rank-6 change: an approximation, nearer to both LoRAs than the plain model is
    assert np.abs(svd1 - sources).mean() < np.abs(plain - sources).mean()


def test_an_sdxl_lora_merged_into_an_sdxl_checkpoint_equals_applying_it(tmp_path):
    """A tiny SDXL diffusers folder becomes an A1111-layout single file (OpenCLIP q/k/v fused);
    a kohya SDXL LoRA (lora_unet_, lora_te1_, lora_te2_) merged into that file gives what
    diffusers' load_lora_weights gives on the folder, the second text encoder included."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from pipelines import probe
    from pipelines.arch import Arch
    from pipelines.configs import load_tokenizer

    # a second text encoder wider than the first, as in SDXL (the single-file loader tells them apart by width)
    folder = factories.write_tiny_sdxl_checkpoint(tmp_path / "xl", seed=0, text_2_width=48)
    lora = factories.write_tiny_sdxl_lora(tmp_path / "xl-lora.safetensors", folder, seed=1)
    assert {k.split("_")[1] for k in tensors(lora)} == {"unet", "te1", "te2"}
    single = merger.merge_checkpoints(tmp_path / "xl.safetensors", folder)  # the folder as an A1111 file
    header = probe.read_safetensors_header(single)
    assert probe.probe_checkpoint(header) is Arch.SDXL
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in header.tensors
    unet_config = dict(UNet2DConditionModel.load_config(folder / "unet"))  # the tiny UNet's block layout
    merged = merger.merge_checkpoints(tmp_path / "xl-merged.safetensors", single, loras=[LoraWeight(lora, 0.7)],
                                      unet_config=unet_config)
    assert json.loads(metadata(merged)["sd_merge_recipe"])["loras"] == [{"name": lora.name, "weight": 0.7}]

    tokenizers = dict(tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(pad_with_bang=True))

    def from_file(path):
        return StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                          **tokenizers)

    def run(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red circle", negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
                    width=64, height=64, generator=torch.Generator().manual_seed(3), output_type="np").images[0]

    def text_2(pipe, ids) -> torch.Tensor:
        with torch.no_grad():
            return pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]

    applied = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **tokenizers)
    base, unmerged = run(applied), from_file(single)
    assert np.abs(run(unmerged) - base).max() < 1e-5  # the folder -> single file conversion is exact
    applied.load_lora_weights(str(lora), adapter_name="xl_lora")
    applied.set_adapters(["xl_lora"], [0.7])
    merged_pipe = from_file(merged)
    ids = applied.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (text_2(applied, ids) - text_2(unmerged, ids)).abs().max() > 1e-2, "the LoRA must reach text_encoder_2"
    torch.testing.assert_close(text_2(merged_pipe, ids), text_2(applied, ids), atol=1e-4, rtol=1e-4)
    with_lora = run(applied)
    assert np.abs(with_lora - base).max() > 0.05
    assert np.abs(run(merged_pipe) - with_lora).max() < 2e-3


def test_with_logins_only_admins_overwrite_an_existing_model(tmp_path):
    """Overwriting replaces a model every user shares: a logged-in non-admin is refused and the
    file stays byte-identical; an admin may; a new name is anyone's."""
    from types import SimpleNamespace

    import gradio as gr

    import app
    from pipelines.settings import Settings
    from ui import merger_tab
    from ui.layout import build_ui

    data = tmp_path / "data"
    ckpts, loras = data / "models" / "Stable-diffusion", data / "models" / "Lora"
    factories.write_tiny_checkpoint(ckpts / "A.safetensors", seed=0)
    factories.write_tiny_checkpoint(ckpts / "B.safetensors", seed=1)
    write_tiny_kohya_lora(loras / "l1.safetensors", seed=1)
    write_tiny_kohya_lora(loras / "l2.safetensors", seed=2)
    ctx = app.build_context(Settings(data_dir=data, auth="@root:rp,guest:gp"))
    assert ctx.authenticator is not None
    blocks, reg = build_ui(ctx)

    def handler(button):
        [fn] = [fn for fn in blocks.fns.values() if (reg[button]._id, "click") in map(tuple, fn.targets)]
        return fn.fn

    def merge(user, **values):  # what Gradio passes: the logged-in user's request
        return handler("merger.run")(**values, request=SimpleNamespace(username=user),
                                     progress=lambda *a, **k: None)

    target, original = ckpts / "B.safetensors", (ckpts / "B.safetensors").read_bytes()
    with pytest.raises(gr.Error, match="only admins .* overwrite a model"):
        merge("guest", primary="A", secondary="B", multiplier=0.0, output_name="B", overwrite=True)
    assert target.read_bytes() == original
    # the LoRA merge guards the same way
    lora_target, lora_original = loras / "l2.safetensors", (loras / "l2.safetensors").read_bytes()
    with pytest.raises(ValueError, match="admin"):
        merger_tab.merge_loras_from_values(ctx, {"loras": "l1:1", "output_name": "l2", "overwrite": True},
                                           lambda f, d: None, username="guest")
    assert lora_target.read_bytes() == lora_original

    # a new name needs no admin
    assert merge("guest", primary="A", secondary="B", output_name="guest mix")[0] == "Saved guest mix.safetensors"
    # the admin may overwrite: B becomes A (multiplier 0 keeps A's weights)
    assert merge("root", primary="A", secondary="B", multiplier=0.0, precision="fp32", output_name="B",
                 overwrite=True)[0] == "Saved B.safetensors"
    assert target.read_bytes() != original
    a, b = tensors(ckpts / "A.safetensors"), tensors(target)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
