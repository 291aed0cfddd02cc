"""A1111 hypernetworks via `<hypernet:name:w>`: they change the image by their strength, act only
for their request (the UNet's attention processors come back), and load through the RAM cache."""
import numpy as np
import pytest

from pipelines.adapters.hypernetworks import load_hypernetwork
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hn-models")
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    factories.write_tiny_hypernetwork(root / "models" / "hypernetworks" / "inkwash.pt", seed=1)
    (root / "embeddings").mkdir()
    manager, _ = make_engine(root, tmp_path_factory.mktemp("data"))
    return manager, root


def _run(manager, prompt):
    request = GenerationRequest(prompt=prompt, checkpoint="tiny.safetensors", width=64, height=64, steps=2,
                                seed=9, save_images=False)
    result = generate(manager, None, request)
    return np.asarray(result.images[0]).astype(int), result.infotexts[0]


def test_hypernetwork_applies_by_strength_for_its_request_only(engine):
    manager, _ = engine
    base, _ = _run(manager, "a red square")
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        processors = dict(active.pipe.unet.attn_processors)
    full, text = _run(manager, "a red square<hypernet:inkwash:1>")
    half, _ = _run(manager, "a red square<hypernet:inkwash:0.4>")
    zero, _ = _run(manager, "a red square<hypernet:inkwash:0>")
    # strength 0 is the plain model (same prompt text, so the same conditioning)
    assert np.abs(full - zero).max() > 8
    assert np.abs(half - zero).max() > 2 and np.abs(full - half).max() > 2
    shorthash = manager.registry.shorthash(manager.registry.find("hypernetwork", "inkwash"))
    assert f'Hypernet hashes: "inkwash: {shorthash}"' in text
    assert "Hypernet:" not in text  # A1111's paste would append a second tag for the legacy key
    after, _ = _run(manager, "a red square")
    assert np.array_equal(after, base)
    assert np.array_equal(zero, base)  # the tag itself is not text for the encoder
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        assert dict(active.pipe.unet.attn_processors) == processors
    assert manager.load_counts["hypernetwork"] == 1  # cached after the first use


def test_hypernetwork_file_layout(engine):
    _, root = engine
    network = load_hypernetwork(root / "models" / "hypernetworks" / "inkwash.pt")
    assert sorted(network.layers) == [32, 64]
    k, v = network.layers[64]
    assert [type(m).__name__ for m in k.linear] == ["Linear", "ReLU", "LayerNorm", "Linear", "LayerNorm"]


def test_processor_without_networks_matches_diffusers_attention(engine):
    import torch

    from pipelines.adapters.hypernetworks import HypernetworkAttnProcessor

    manager, _ = engine
    with manager.pipeline("txt2img", "tiny.safetensors") as active:
        unet = active.pipe.unet
        sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = unet(sample, 10, encoder_hidden_states=context).sample
            original = unet.attn_processors
            unet.set_attn_processor(HypernetworkAttnProcessor([]))
            try:
                ours = unet(sample, 10, encoder_hidden_states=context).sample
            finally:
                unet.set_attn_processor(original)
    assert torch.equal(ours, expected)


def test_pasted_infotext_applies_the_hypernetwork_once(engine):
    manager, _ = engine
    tagged, text = _run(manager, "a red square<hypernet:inkwash:0.6>")
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a red square<hypernet:inkwash:0.6>"
    assert np.array_equal(_run(manager, parsed["Prompt"])[0], tagged)
    # the same tag twice in a prompt applies once
    assert np.array_equal(_run(manager, "a red square<hypernet:inkwash:0.6><hypernet:inkwash:0.6>")[0], tagged)
    # legacy A1111 infotexts name it in a `Hypernet` key: a tag is added only where the prompt lacks it
    legacy = "a red square\nSteps: 2, Seed: 9, Hypernet: inkwash, Hypernet strength: 0.6"
    assert parse_infotext(legacy)["Prompt"] == "a red square<hypernet:inkwash:0.6>"
    both = "a red square<hypernet:inkwash:0.6>\nSteps: 2, Seed: 9, Hypernet: inkwash, Hypernet strength: 0.6"
    assert parse_infotext(both)["Prompt"] == "a red square<hypernet:inkwash:0.6>"
    several = 'a red square<hypernet:inkwash:0.6>\nSteps: 2, Seed: 9, Hypernet: "inkwash, ink2"'
    assert parse_infotext(several)["Prompt"] == "a red square<hypernet:inkwash:0.6><hypernet:ink2:1.0>"


def _a1111_cross_attention(attn, hidden, context, pair, strength):
    """One cross-attention by hand, as A1111 applies a hypernetwork: key and value from
    `context + mlp(context) * strength` (one MLP each), the query from the hidden states as is."""
    import torch

    mlp_k, mlp_v = pair
    query = attn.to_q(hidden)
    key = attn.to_k(context + mlp_k.linear(context) * strength)
    value = attn.to_v(context + mlp_v.linear(context) * strength)
    batch, tokens, inner = query.shape
    head = inner // attn.heads
    q, k, v = (t.reshape(batch, -1, attn.heads, head).transpose(1, 2) for t in (query, key, value))
    weights = torch.softmax(q @ k.transpose(-1, -2) / head ** 0.5, dim=-1)
    return attn.to_out[0]((weights @ v).transpose(1, 2).reshape(batch, tokens, inner))  # to_out[1]: dropout


def test_hypernetwork_attention_equals_the_hand_computed_a1111_formula_within_its_scope(tmp_path):
    import torch

    from pipelines.adapters.hypernetworks import HypernetworkAttnProcessor, scoped_hypernetworks

    unet = factories.tiny_unet(seed=3)
    network = load_hypernetwork(factories.write_tiny_hypernetwork(tmp_path / "hn.pt", seed=4))
    name, attn = next((n, m) for n, m in unet.named_modules() if n.endswith("attn2"))
    width = attn.to_k.in_features
    assert width in network.layers  # the MLP pair is chosen by the context's width
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=generator)
    context = torch.randn(2, 7, width, generator=generator)
    original = type(attn.processor)
    with torch.no_grad():
        plain = attn(hidden, encoder_hidden_states=context)
        with scoped_hypernetworks(unet, [(network, 0.7)]):
            assert isinstance(attn.processor, HypernetworkAttnProcessor)
            ours = attn(hidden, encoder_hidden_states=context)
        after = attn(hidden, encoder_hidden_states=context)
        expected = _a1111_cross_attention(attn, hidden, context, network.layers[width], 0.7)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4), name
    assert (ours - plain).abs().max() > 1e-2  # the hypernetwork really changes the layer
    # a strength of 0 or the key/value swapped would not match the reference
    swapped = _a1111_cross_attention(attn, hidden, context, network.layers[width][::-1], 0.7)
    assert not torch.allclose(ours, swapped, atol=1e-4)
    # the scope over: the original processor, and plain attention's output exactly
    assert type(attn.processor) is original and not isinstance(attn.processor, HypernetworkAttnProcessor)
    assert torch.equal(after, plain)
