"""Legacy .ckpt files: plain tensors load through torch's weights-only unpickler; anything that
needs full unpickling is refused with a message, and nothing in it runs."""
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from pipelines.generate import generate
from pipelines.loading import ModelLoadError
from pipelines.request import GenerationRequest
from tests import factories
from tests.integration.conftest import make_engine

REQUEST = dict(prompt="a red circle", width=64, height=64, steps=2, seed=9, sampler="Euler", save_images=False)


class Payload:
    """Unpickling this would run code: the loader must never get that far."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['EASEL_PWNED']).write_text('x')",))


def test_ckpt_with_plain_tensors_loads_and_matches_the_safetensors_file(tmp_path):
    models = tmp_path / "a1111" / "models" / "Stable-diffusion"
    sft = factories.write_tiny_checkpoint(models / "tiny.safetensors", seed=0)
    torch.save({"state_dict": safetensors.torch.load_file(sft)}, models / "legacy.ckpt")
    manager, _ = make_engine(tmp_path / "a1111", tmp_path / "data")
    a = generate(manager, None, GenerationRequest(checkpoint="tiny.safetensors", **REQUEST)).images[0]
    b = generate(manager, None, GenerationRequest(checkpoint="legacy.ckpt", **REQUEST)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_ckpt_that_needs_full_unpickling_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EASEL_PWNED", str(marker))
    models = tmp_path / "a1111" / "models" / "Stable-diffusion"
    factories.write_tiny_checkpoint(models / "good.safetensors", seed=0)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, models / "evil.ckpt",
               pickle_protocol=2)
    manager, _ = make_engine(tmp_path / "a1111", tmp_path / "data")
    generate(manager, None, GenerationRequest(checkpoint="good", **REQUEST))
    with pytest.raises(ModelLoadError, match="full unpickling.*refused"):
        generate(manager, None, GenerationRequest(checkpoint="evil.ckpt", **REQUEST))
    assert not marker.exists()
    assert manager.snapshot()["checkpoint"] == "good.safetensors"
