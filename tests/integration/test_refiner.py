"""SDXL refiner on tiny random SDXL base + refiner folders: switch at 1.0 is the base alone, an
earlier switch hands the latents to the refiner (loaded once through the manager's cache)."""
import numpy as np
import pytest

from pipelines.arch import Arch
from pipelines.generate import generate
from pipelines.metadata import parse_infotext
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
