"""The A1111 prompt encoder against diffusers' own encoding, on tiny random text encoders."""
import pytest
import torch

from pipelines.configs import load_tokenizer
from pipelines.prompts.conditioning import build_conditioning
from pipelines.prompts.encoding import EncoderStack, count_tokens, encode_prompt, tokenize_chunks
from tests import factories


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**factories.tiny_components(seed=0), tokenizer=load_tokenizer(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sdxl_pipe():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                 projection_dim=16, vocab_size=49408, max_position_embeddings=77)
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(**small)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**small, hidden_act="gelu")).eval()
    return StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=load_tokenizer(),
                                     tokenizer_2=load_tokenizer(pad_with_bang=True), unet=None, scheduler=None)


def _encode(pipe, text, **kw):
    return encode_prompt(EncoderStack.from_pipe(pipe), text, **kw)


@pytest.mark.parametrize("text", ["a cat on a hill, sunset", "", "wow!! \\(escaped\\) text"])
def test_weight_one_equals_diffusers_sd(sd_pipe, text):
    expected, _ = sd_pipe.encode_prompt(text.replace("\\", ""), torch.device("cpu"), 1, False)
    ours = _encode(sd_pipe, text).embeds
    assert ours.shape == expected.shape == (1, 77, 64)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_uses_the_nth_last_layer_with_final_norm(sd_pipe, clip_skip):
    # A1111 "Clip skip: N": hidden state N from the end, then the final layer norm. (diffusers'
    # own clip_skip path reads `.text_model`, which transformers 5 removed, so we compute it here.)
    ids = sd_pipe.tokenizer("a red ball", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = sd_pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = sd_pipe.text_encoder.final_layer_norm(states[-clip_skip])
    assert torch.equal(_encode(sd_pipe, "a red ball", clip_skip=clip_skip).embeds, expected)
    assert not torch.equal(expected, _encode(sd_pipe, "a red ball").embeds)


def test_clip_skip_out_of_range_is_value_error(sd_pipe):
    with pytest.raises(ValueError, match="clip skip"):
        _encode(sd_pipe, "x", clip_skip=13)


def test_weight_one_equals_diffusers_sdxl(sdxl_pipe):
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt("a blue square", device=torch.device("cpu"),
                                                   do_classifier_free_guidance=False)
    ours = _encode(sdxl_pipe, "a blue square")
    assert ours.embeds.shape == (1, 77, 64) and torch.equal(ours.embeds, embeds)
    assert torch.equal(ours.pooled, pooled)


def test_explicit_weight_one_equals_plain(sd_pipe):
    assert torch.equal(_encode(sd_pipe, "a (cat:1.0) b").embeds, _encode(sd_pipe, "a cat b").embeds)


@pytest.fixture
def biased_sd_pipe(sd_pipe):
    """sd_pipe with a final-layer-norm bias, as real CLIP has: a zero-bias norm gives outputs whose
    mean is float noise (~1e-8), and restoring a mean of noise cannot be checked."""
    bias = sd_pipe.text_encoder.final_layer_norm.bias
    backup = bias.detach().clone()
    with torch.no_grad():
        bias.copy_(torch.linspace(-0.2, 0.6, bias.numel()))
    yield sd_pipe
    with torch.no_grad():
        bias.copy_(backup)


def test_emphasis_original_restores_mean_and_no_norm_does_not(biased_sd_pipe):
    sd_pipe = biased_sd_pipe
    plain = _encode(sd_pipe, "a red ball").embeds
    original = _encode(sd_pipe, "a (red:1.5) ball").embeds
    no_norm = _encode(sd_pipe, "a (red:1.5) ball", emphasis="No norm").embeds
    assert plain.mean().item() > 0.1
    assert original.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)
    assert no_norm.mean().item() != pytest.approx(plain.mean().item(), rel=1e-4)
    assert not torch.allclose(original, plain)
    # "No norm" is exactly the token vector times its weight
    tokens = load_tokenizer()("a red ball")["input_ids"]
    red = tokens.index(load_tokenizer().convert_tokens_to_ids("red</w>"))
    assert torch.allclose(no_norm[0, red], plain[0, red] * 1.5)
    assert torch.allclose(no_norm[0, 0], plain[0, 0])


def test_original_emphasis_restores_the_mean_over_the_whole_editing_schedule(biased_sd_pipe):
    """A1111 encodes a prompt's schedule texts as one batch and restores z.mean() over that
    batch, so "(red:1.6)" in the first text scales the second one too."""
    pipe = biased_sd_pipe
    first_text, second_text = "a (red:1.6) ball", "a blue ball"
    cond = build_conditioning(pipe, [f"[{first_text}:{second_text}:0.5]"], [""], steps=4)
    first, second = cond.pipeline_kwargs(1)["prompt_embeds"], cond.pipeline_kwargs(4)["prompt_embeds"]
    # by hand: both texts through the encoder at once, weighted, one mean restored over both
    tokenizer = pipe.tokenizer
    ids = tokenizer(["a red ball", second_text], padding="max_length", max_length=77, return_tensors="pt").input_ids
    weights = torch.ones(2, 77)
    weights[0, ids[0].tolist().index(tokenizer.convert_tokens_to_ids("red</w>"))] = 1.6
    with torch.no_grad():
        z = pipe.text_encoder(ids).last_hidden_state
    weighted = z * weights[..., None]
    expected = weighted * (z.mean() / weighted.mean())
    assert torch.allclose(first[0], expected[0], atol=1e-6) and torch.allclose(second[0], expected[1], atol=1e-6)
    # ...which is not what each text encoded alone gives: the unweighted text is scaled too
    assert not torch.allclose(second, _encode(pipe, second_text).embeds, atol=1e-6)
    assert torch.allclose(first, _encode(pipe, first_text).embeds * (z.mean() / weighted.mean())
                          / (z[0].mean() / weighted[0].mean()), atol=1e-6)
    # without weights the schedule's texts encode exactly as alone
    plain = build_conditioning(pipe, [f"[a red ball:{second_text}:0.5]"], [""], steps=4)
    assert torch.equal(plain.pipeline_kwargs(4)["prompt_embeds"], _encode(pipe, second_text).embeds)


def test_a_200_token_prompt_makes_exactly_three_chunks_and_samples(sd_pipe):
    """67 x "red circle" joined by ", " is 67*2 + 66 = 200 tokens; each 75-token chunk ends on a
    comma (25 items), so A1111's packing gives chunks of 75, 75 and 50 tokens, all sampled."""
    items = ["red circle"] * 67
    words = ", ".join(items)
    tokenizer = sd_pipe.tokenizer
    assert len(tokenizer(words, add_special_tokens=False)["input_ids"]) == 200
    chunks, count = tokenize_chunks(tokenizer, words)
    assert count == 200 and [len(c.tokens) for c in chunks] == [75, 75, 50]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    assert chunks[0].tokens[-1] == chunks[1].tokens[-1] == comma  # cut after a comma, not mid-item
    assert count_tokens(tokenizer, "a cat") == (2, 75)
    assert count_tokens(tokenizer, words) == (200, 225)

    def sample(prompt):
        cond = build_conditioning(sd_pipe, [prompt], ["ugly"], steps=2)
        kwargs = cond.pipeline_kwargs()
        latents = sd_pipe(**kwargs, num_inference_steps=2, guidance_scale=5, width=32, height=32,
                          output_type="latent", generator=torch.Generator().manual_seed(1)).images
        return kwargs, latents

    kwargs, latents = sample(words)
    # three 77-token chunks; the one-chunk negative prompt padded with empty chunks to match
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 3 * 77, 64)
    assert torch.equal(kwargs["prompt_embeds"][:, 154:], _encode(sd_pipe, ", ".join(items[50:])).embeds)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    _, first_two_chunks = sample(", ".join(items[:50]))  # 149 tokens: the third chunk dropped
    assert not torch.equal(latents, first_two_chunks)  # the third chunk reached the UNet


def test_no_comma_within_twenty_tokens_is_a_hard_cut_at_75(sd_pipe):
    tokenizer = sd_pipe.tokenizer
    comma, cat, dog = tokenizer.convert_tokens_to_ids([",</w>", "cat</w>", "dog</w>"])
    # the comma is chunk token 54, 21 tokens before the limit: too far back, A1111 cuts at 75
    hard = " ".join(["cat"] * 54) + ", " + " ".join(["dog"] * 25)  # 80 tokens
    chunks, count = tokenize_chunks(tokenizer, hard)
    assert [len(c.tokens) for c in chunks] == [75, 5] and count == 80
    assert chunks[0].tokens[54] == comma and chunks[0].tokens[55:] == [dog] * 20 and chunks[1].tokens == [dog] * 5
    assert count_tokens(tokenizer, hard) == (80, 150)
    assert _encode(sd_pipe, hard).embeds.shape == (1, 2 * 77, 64)
    # one token later the comma is 20 back: the 19 tokens after it move on, and the first
    # chunk still counts as 75 used tokens (A1111's counter shows 100/150)
    soft = " ".join(["cat"] * 55) + ", " + " ".join(["dog"] * 25)  # 81 tokens
    chunks, count = tokenize_chunks(tokenizer, soft)
    assert [len(c.tokens) for c in chunks] == [56, 25] and count == 100
    assert chunks[0].tokens == [cat] * 55 + [comma] and chunks[1].tokens == [dog] * 25


@pytest.fixture(scope="module")
def ti_pipe():
    """A tiny SD pipe of its own with a three-vector textual-inversion embedding `zqxtri`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**factories.tiny_components(seed=0), tokenizer=load_tokenizer(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    pipe.load_textual_inversion({"zqxtri": vectors}, token="zqxtri")
    return pipe


def test_multi_vector_embedding_is_never_split_across_chunks(ti_pipe):
    tokenizer, convert = ti_pipe.tokenizer, ti_pipe.maybe_convert_prompt
    tri = tokenizer.convert_tokens_to_ids(["zqxtri", "zqxtri_1", "zqxtri_2"])
    # 73 words + 3 vectors = 76: A1111 moves the whole embedding to the next chunk
    text = " ".join(["cat"] * 73) + " zqxtri"
    chunks, count = tokenize_chunks(tokenizer, text, convert)
    assert [len(c.tokens) for c in chunks] == [73, 3] and chunks[1].tokens == tri and count == 78
    # 72 + 3 = 75 fits: it stays
    chunks, count = tokenize_chunks(tokenizer, " ".join(["cat"] * 72) + " zqxtri", convert)
    assert [len(c.tokens) for c in chunks] == [75] and chunks[0].tokens[-3:] == tri and count == 75
    # the weight goes with every vector
    chunks, _ = tokenize_chunks(tokenizer, " ".join(["cat"] * 73) + " (zqxtri:1.2)", convert)
    assert chunks[1].tokens == tri and chunks[1].weights == pytest.approx([1.2] * 3)
    # the second chunk is exactly the embedding alone
    encoded = _encode(ti_pipe, text)
    assert encoded.embeds.shape == (1, 2 * 77, 64)
    assert torch.allclose(encoded.embeds[:, 77:], _encode(ti_pipe, "zqxtri").embeds, atol=1e-6)


def test_break_pads_the_chunk(sd_pipe):
    chunks, _ = tokenize_chunks(sd_pipe.tokenizer, "a cat BREAK a dog")
    assert [len(c.tokens) for c in chunks] == [2, 2]
    assert _encode(sd_pipe, "a cat BREAK a dog").chunks == 2


def test_negative_padded_to_positive_chunks_and_editing_switches(sd_pipe):
    long = ", ".join(f"word{i}" for i in range(40))
    cond = build_conditioning(sd_pipe, [f"[cat:dog:0.5] {long}"], ["ugly"], steps=4)
    first = cond.pipeline_kwargs(1)
    assert first["prompt_embeds"].shape == first["negative_prompt_embeds"].shape == (1, 154, 64)
    assert torch.equal(first["negative_prompt_embeds"][:, :77], _encode(sd_pipe, "ugly").embeds)
    assert torch.equal(first["negative_prompt_embeds"][:, 77:], _encode(sd_pipe, "").embeds)
    sd_pipe._guidance_scale, sd_pipe._num_timesteps = 7.0, 4
    # schedule [(2, cat), (4, dog)]; A1111's 0-based call counter takes "cat" for calls 0-2
    assert cond.callback_outputs(sd_pipe, 0) == {}  # step 2 still "cat"
    assert cond.callback_outputs(sd_pipe, 1) == {}  # step 3 still "cat" (A1111: call 2 <= 2)
    switched = cond.callback_outputs(sd_pipe, 2)["prompt_embeds"]  # step 4 is "dog"
    assert switched.shape == (2, 154, 64)
    assert torch.equal(switched[1:], _encode(sd_pipe, f"dog {long}").embeds)
    assert torch.equal(switched[:1, :77], _encode(sd_pipe, "ugly").embeds)


def test_and_parts_are_encoded_and_weighted(sd_pipe):
    cond = build_conditioning(sd_pipe, ["a cat AND [a dog:a fox:2] :0.5", "plain"], ["", ""], steps=4)
    assert cond.composable and cond.changes_during_sampling
    embeds, pooled, weights = cond._part_tensors(1)
    assert embeds.shape == (2, 2, 77, 64) and pooled is None
    assert weights.tolist() == [[1.0, 0.5], [1.0, 0.0]]  # "plain" padded with a weight-0 copy
    assert torch.equal(embeds[0, 1], _encode(sd_pipe, " a dog").embeds[0])
    assert torch.equal(cond._part_tensors(3)[0][0, 1], _encode(sd_pipe, " a dog").embeds[0])  # A1111: call 2 <= 2
    assert torch.equal(cond._part_tensors(4)[0][0, 1], _encode(sd_pipe, " a fox").embeds[0])
    assert not build_conditioning(sd_pipe, ["ANDROID"], [""], steps=4).composable


def test_composable_unet_combines_parts_like_a1111():
    from pipelines.prompts.composable import ComposableUNet

    class Fake(torch.nn.Module):  # "noise" = latents scaled by the mean of the conditioning
        def forward(self, sample, t, hidden, added_cond_kwargs=None, return_dict=False):
            return (sample * hidden.mean(dim=(1, 2)).reshape(-1, 1, 1, 1),)

    wrapper = ComposableUNet(Fake())
    parts = torch.stack([torch.full((1, 3, 2), 2.0), torch.full((1, 3, 2), 5.0)], dim=1)  # B=1, K=2
    wrapper.set_parts(parts, None, torch.tensor([[1.0, 0.5]]))
    sample = torch.ones(2, 1, 2, 2)
    uncond_hidden = torch.full((1, 3, 2), 1.0)
    out = wrapper(sample, 10, torch.cat([uncond_hidden, torch.zeros(1, 3, 2)]), return_dict=False)[0]
    # uncond = 1; parts give 2 and 5: 1 + 1*(2-1) + 0.5*(5-1) = 4
    assert torch.allclose(out[0], torch.ones(1, 2, 2)) and torch.allclose(out[1], torch.full((1, 2, 2), 4.0))


def test_sdxl_empty_negative_is_zeros(sdxl_pipe):
    cond = build_conditioning(sdxl_pipe, ["a cat <lora:x:1>"], [""], steps=2)
    kwargs = cond.pipeline_kwargs()
    assert not kwargs["negative_prompt_embeds"].any() and not kwargs["negative_pooled_prompt_embeds"].any()
    assert torch.equal(kwargs["prompt_embeds"], _encode(sdxl_pipe, "a cat ").embeds)


def test_sdxl_ignores_clip_skip_unless_clip_l_skip_is_on(sdxl_pipe, sd_pipe):
    stack, text = EncoderStack.from_pipe(sdxl_pipe), "a blue square"
    default = encode_prompt(stack, text)
    # A1111's default: clip skip changes nothing on SDXL (both encoders stay on their penultimate layer)
    for clip_skip in (2, 3):
        skipped = encode_prompt(stack, text, clip_skip=clip_skip)
        assert torch.equal(skipped.embeds, default.embeds) and torch.equal(skipped.pooled, default.pooled)
    ids = [tok(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2)]
    with torch.no_grad():
        clip_l = sdxl_pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states
        clip_g = sdxl_pipe.text_encoder_2(ids[1], output_hidden_states=True).hidden_states
    # "Clip skip SDXL" on: CLIP-L gives hidden_states[-N] (no final norm), CLIP-G stays penultimate
    for clip_skip in (1, 2, 3):
        on = encode_prompt(stack, text, clip_skip=clip_skip, sdxl_clip_l_skip=True)
        assert torch.equal(on.embeds[..., :32], clip_l[-clip_skip])
        assert torch.equal(on.embeds[..., 32:], clip_g[-2])
        assert torch.equal(on.pooled, default.pooled)
    assert torch.equal(encode_prompt(stack, text, clip_skip=2, sdxl_clip_l_skip=True).embeds, default.embeds)
    assert not torch.equal(encode_prompt(stack, text, sdxl_clip_l_skip=True).embeds, default.embeds)
    cond = build_conditioning(sdxl_pipe, [text], ["ugly"], steps=2, clip_skip=3, sdxl_clip_l_skip=True)
    assert torch.equal(cond.pipeline_kwargs()["prompt_embeds"][..., :32], clip_l[-3])
    # SD1 has one encoder: the option changes nothing there
    sd = EncoderStack.from_pipe(sd_pipe)
    assert torch.equal(encode_prompt(sd, text, clip_skip=2, sdxl_clip_l_skip=True).embeds,
                       encode_prompt(sd, text, clip_skip=2).embeds)


@pytest.fixture(scope="module")
def sdxl_full(sdxl_pipe):
    """The tiny SDXL encoders with a tiny text-time UNet and VAE: a pipeline that samples."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8).eval()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=sdxl_pipe.text_encoder, tokenizer=sdxl_pipe.tokenizer,
                                     text_encoder_2=sdxl_pipe.text_encoder_2, tokenizer_2=sdxl_pipe.tokenizer_2,
                                     unet=unet, scheduler=EulerDiscreteScheduler())


def test_sdxl_sampling_with_editing_and_and(sdxl_full):
    def run(prompt):
        cond = build_conditioning(sdxl_full, [prompt] * 2, ["", "ugly"], steps=3)
        cond.install(sdxl_full)
        latents = sdxl_full(**cond.pipeline_kwargs(), num_inference_steps=3, guidance_scale=5, width=32, height=32,
                            output_type="latent", generator=[torch.Generator().manual_seed(1) for _ in range(2)],
                            callback_on_step_end=lambda pipe, i, _t, _k: cond.callback_outputs(pipe, i),
                            callback_on_step_end_tensor_inputs=["latents", *cond.tensor_inputs]).images
        cond.finish()
        return latents

    # [a cat:a dog:1] over 3 steps: "a cat" for steps 1-2 (A1111 calls 0 and 1), "a dog" for step 3
    plain, edited, composed = run("a cat"), run("[a cat:a dog:1]"), run("a cat AND a dog :0.5")
    assert plain.shape == edited.shape == composed.shape == (2, 4, 32, 32)
    assert not torch.equal(plain, edited) and not torch.equal(plain, composed)
    assert type(sdxl_full.unet).__name__ == "UNet2DConditionModel"  # the AND wrapper is gone


# --- through generate(): styles, wildcards, one encoding per request ---------------------------

STYLES_CSV = ('name,prompt,negative_prompt\n'
              '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
              '"Night","{prompt} at night, stars","daylight"\n')
GEN = dict(checkpoint="tiny.safetensors", width=64, height=64, steps=2, cfg_scale=5, sampler="Euler",
           save_images=False, seed=21)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny SD checkpoint (and a tiny SDXL one), a data dir with styles.csv and a wildcard file."""
    from pipelines.prompts.source import PromptSource
    from tests.integration.conftest import make_engine

    root = tmp_path_factory.mktemp("prompt-engine")
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    factories.write_tiny_sdxl_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sdxl", seed=0)
    (root / "embeddings").mkdir()
    data = root / "data"
    (data / "wildcards").mkdir(parents=True)
    (data / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    (data / "wildcards" / "colour.txt").write_text("red\nblue\ngreen\n", encoding="utf-8")
    manager, _ = make_engine(root, data)
    return manager, PromptSource.for_data_dir(data)


def _pixels(image):
    import numpy as np

    return np.asarray(image, dtype=np.int16)


def _generate(manager, source=None, **changes):
    from pipelines.generate import generate
    from pipelines.request import GenerationRequest

    return generate(manager, None, GenerationRequest(**{**GEN, **changes}), prompts=source)


def test_batch_of_three_records_each_images_own_styled_and_resolved_prompt(engine):
    from pipelines.metadata import parse_infotext
    from pipelines.request import GenerationRequest

    manager, source = engine
    changes = dict(prompt="a {big|small|tiny} __colour__ fox", negative_prompt="blurry", styles=("Night",),
                   batch_size=3, wildcard_mode="combinatorial")
    result = _generate(manager, source, **changes)
    infos = [parse_infotext(text) for text in result.infotexts]
    prompts = [info["Prompt"] for info in infos]
    _, expected = source.prepare(GenerationRequest(**{**GEN, **changes}), 21)
    assert prompts == [p.prompt for p in expected] and len(set(prompts)) == 3
    assert all(p.startswith("a ") and p.endswith(" fox at night, stars") and not {"{", "__"} & set(p) for p in prompts)
    assert [info["Negative prompt"] for info in infos] == ["blurry, daylight"] * 3
    assert [str(info["Seed"]) for info in infos] == ["21", "22", "23"]
    # the last image was sampled from its own prompt: it is that prompt alone with seed 23, and
    # not the first image's prompt with seed 23
    alone = _generate(manager, source, prompt=prompts[2], negative_prompt="blurry, daylight", seed=23)
    assert abs(_pixels(alone.images[0]) - _pixels(result.images[2])).max() <= 1
    other = _generate(manager, source, prompt=prompts[0], negative_prompt="blurry, daylight", seed=23)
    assert abs(_pixels(other.images[0]) - _pixels(result.images[2])).max() > 1


def test_img2img_with_styles_samples_the_styled_prompt_and_writes_a1111_infotext(engine):
    from PIL import Image

    from pipelines.metadata import parse_infotext

    manager, source = engine
    img2img = dict(task="img2img", init_image=Image.new("RGB", (64, 64), (200, 40, 40)), denoising_strength=0.6,
                   steps=4)
    styled = _generate(manager, source, prompt="a fox", negative_prompt="blurry", styles=("Cinematic",), **img2img)
    written = _generate(manager, source, prompt="cinematic still of a fox, film grain",
                        negative_prompt="blurry, cartoon, drawing", **img2img)
    plain = _generate(manager, source, prompt="a fox", negative_prompt="blurry", **img2img)
    assert styled.images[0].tobytes() == written.images[0].tobytes()
    assert styled.images[0].tobytes() != plain.images[0].tobytes()
    assert styled.infotexts == written.infotexts  # A1111 records the styled text, not the style names
    info = parse_infotext(styled.infotexts[0])
    assert info["Prompt"] == "cinematic still of a fox, film grain"
    assert info["Negative prompt"] == "blurry, cartoon, drawing"
    assert str(info["Denoising strength"]) == "0.6" and str(info["Steps"]) == "4"
    # reading it back (PNG Info) takes the style out again
    assert source.styles.extract(info["Prompt"], info["Negative prompt"]) == (["Cinematic"], "a fox", "blurry")


def test_each_text_is_encoded_once_per_request_not_once_per_batch(engine, monkeypatch):
    import pipelines.prompts.conditioning as conditioning

    manager, source = engine
    encoded = []
    real = conditioning.encode_prompts

    def counting(stack, texts, *args, **kwargs):
        encoded.extend(texts)
        return real(stack, texts, *args, **kwargs)

    monkeypatch.setattr(conditioning, "encode_prompts", counting)
    two = _generate(manager, source, prompt="a red fox", negative_prompt="blurry", batch_count=2, steps=1)
    assert sorted(encoded) == ["a red fox", "blurry"]  # was 4: both texts again for the second batch
    encoded.clear()
    one = _generate(manager, source, prompt="a red fox", negative_prompt="blurry", seed=22, steps=1)
    assert sorted(encoded) == ["a red fox", "blurry"]
    assert two.images[1].tobytes() == one.images[0].tobytes()  # reused tensors, the same picture
    # batches with other prompts (wildcards): every distinct text once, the shared negative too
    encoded.clear()
    _generate(manager, source, prompt="a {red|blue} fox", negative_prompt="blurry", batch_count=2, steps=1,
              wildcard_mode="combinatorial")
    assert sorted(encoded) == ["a blue fox", "a red fox", "blurry"]


def test_sdxl_clip_skip_through_generate_follows_the_clip_l_setting(engine):
    from pipelines.prompts.source import PromptSource

    manager, _source = engine
    sdxl = dict(checkpoint="tiny-sdxl", prompt="a red fox", steps=2)
    base = _generate(manager, **sdxl)
    skip2 = _generate(manager, **sdxl, clip_skip=2)
    assert skip2.images[0].tobytes() == base.images[0].tobytes()  # ignored on SDXL (A1111 default)
    assert "Clip skip: 2" in skip2.infotexts[0]  # and recorded as A1111 does, whatever the model
    on = PromptSource(sdxl_clip_l_skip=True)
    assert _generate(manager, on, **sdxl, clip_skip=2).images[0].tobytes() == base.images[0].tobytes()
    assert _generate(manager, on, **sdxl, clip_skip=1).images[0].tobytes() != base.images[0].tobytes()
