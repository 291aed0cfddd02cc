"""A small A1111-style models folder with tiny random-weight models, shared by the engine tests."""
from pathlib import Path

import pytest
import torch

from tests import factories


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a1111")
    models = root / "models"
    (models / "Stable-diffusion" / "sub").mkdir(parents=True)
    (models / "VAE").mkdir(parents=True)
    factories.write_tiny_checkpoint(models / "Stable-diffusion" / "tinyA.safetensors", seed=0)
    factories.write_tiny_checkpoint(models / "Stable-diffusion" / "sub" / "tinyB.safetensors", seed=1)
    factories.write_tiny_vae(models / "VAE" / "warm.safetensors", seed=1)
    (models / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    # a VAE dropped into the checkpoint folder: the wrong kind of model
    factories.write_tiny_vae(models / "Stable-diffusion" / "actually-a-vae.safetensors", seed=2)
    (root / "embeddings").mkdir()
    return root


@pytest.fixture(scope="module")
def engine(tiny_models_dir, tmp_path_factory):
    """Shared by a module's tests: loading is the slow part; tests that count loads make their own."""
    return make_engine(tiny_models_dir, tmp_path_factory.mktemp("data"))


def make_engine(models_root: Path, data_dir: Path, ram_bytes: int = 1 << 30, builtin_dir: Path | None = None):
    from pipelines.cache import ModelCache
    from pipelines.hashing import HashCache
    from pipelines.manager import PipelineManager
    from pipelines.outputs import OutputStore
    from pipelines.registry import ModelPaths, ModelRegistry

    paths = ModelPaths(models_dir=models_root / "models", embeddings_dir=models_root / "embeddings",
                       builtin_dir=builtin_dir or data_dir / "no-builtin")
    registry = ModelRegistry(paths, HashCache(data_dir / "cache.json"))
    registry.refresh()
    manager = PipelineManager(registry, ModelCache(ram_bytes), torch.device("cpu"), torch.float32)
    return manager, OutputStore(data_dir / "outputs")
