"""A1111's sidecar VAE: `<checkpoint>.vae.safetensors` beside a checkpoint is its VAE under
"Automatic": the pixels are that VAE's, the manager snapshot names it and the infotext records it."""
import numpy as np
import pytest

from pipelines.generate import generate
from pipelines.hashing import sha256_file
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecar-models")
    folder = root / "models" / "Stable-diffusion"
    factories.write_tiny_checkpoint(folder / "tiny.safetensors", seed=0)
    factories.write_tiny_vae(folder / "tiny.vae.safetensors", seed=3)  # not the checkpoint's own VAE
    factories.write_tiny_checkpoint(folder / "plain.safetensors", seed=0)  # same weights, no sidecar
    (root / "embeddings").mkdir()
    manager, _ = make_engine(root, tmp_path_factory.mktemp("data"))
    return manager


def _run(manager, checkpoint, vae):
    request = GenerationRequest(prompt="a red square", checkpoint=checkpoint, vae=vae, width=64, height=64,
                                steps=2, seed=4, save_images=False)
    result = generate(manager, None, request)
    return np.asarray(result.images[0]).astype(int), parse_infotext(result.infotexts[0])


def test_sidecar_vae_is_used_under_automatic_and_recorded(engine):
    manager = engine
    registry = manager.registry
    entry = registry.find("checkpoint", "tiny")
    assert entry.sidecar_vae is not None and entry.sidecar_vae.name == "tiny.vae.safetensors"
    assert [e.name for e in registry.checkpoints() if not e.builtin] == ["plain.safetensors", "tiny.safetensors"]

    own, own_info = _run(manager, "tiny.safetensors", "None")
    assert manager.snapshot()["vae"] == "Automatic"  # "None": the checkpoint's own VAE
    assert "VAE hash" not in own_info and "VAE" not in own_info
    sidecar, info = _run(manager, "tiny.safetensors", "Automatic")
    assert np.abs(sidecar - own).max() > 8  # decoded by the sidecar, not by the checkpoint's VAE
    assert manager.snapshot()["vae"] == "tiny.vae.safetensors"
    assert info["VAE"] == "tiny.vae.safetensors"
    assert info["VAE hash"] == sha256_file(entry.sidecar_vae)[:10]
    assert manager.load_counts["vae"] == 1

    # a checkpoint without a sidecar: Automatic is its own VAE (same weights as tiny's: same pixels)
    plain, plain_info = _run(manager, "plain.safetensors", "Automatic")
    assert np.array_equal(plain, own) and "VAE hash" not in plain_info
    assert manager.snapshot()["vae"] == "Automatic"
    # back to tiny: the sidecar again, from the RAM cache
    again, _ = _run(manager, "tiny.safetensors", "Automatic")
    assert np.array_equal(again, sidecar) and manager.load_counts["vae"] == 1
