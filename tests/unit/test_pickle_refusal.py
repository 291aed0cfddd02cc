"""Pickled code in every `.pt`/`.pth` kind Easel reads (embeddings, hypernetworks, ControlNets,
upscalers) is refused with one short line and never runs: each file sits where A1111 keeps it and
is loaded through the same functions generation uses."""
import pickle
import re

import pytest
import torch
from PIL import Image

from pipelines import upscalers
from pipelines.adapters.embeddings import read_embedding
from pipelines.adapters.hypernetworks import load_hypernetwork
from pipelines.cache import ModelCache
from pipelines.control.models import load_controlnet
from pipelines.hashing import HashCache
from pipelines.registry import ModelPaths, ModelRegistry

MARKER_NAME = "pwned"


class Payload:
    """Unpickling this creates the marker file (a real attack would do worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


def write_evil(path, marker, torch_format: bool) -> None:
    """A model-shaped dict with the payload among real tensors; saved the way torch.save does
    (a zip, as A1111's files are) or as a bare legacy pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"string_to_param": {"*": torch.zeros(1, 8)}, "state_dict": {"w": torch.zeros(2)},
            "hook": Payload(marker)}
    if torch_format:
        torch.save(data, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(data, handle, protocol=2)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / MARKER_NAME
    # the payload itself works: plain unpickling would run it (so the test can fail)
    probe = tmp_path / "probe.pkl"
    write_evil(probe, path, torch_format=False)
    pickle.loads(probe.read_bytes())
    assert path.exists()
    path.unlink()
    probe.unlink()
    return path


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "bare pickle"])
def test_malicious_pickles_are_refused_by_every_loader_and_never_run(tmp_path, marker, torch_format):
    root = tmp_path / "webui"
    models = root / "models"
    files = {"embedding": root / "embeddings" / "evil.pt", "hypernetwork": models / "hypernetworks" / "evil.pt",
             "controlnet": models / "ControlNet" / "evil.pth", "upscaler": models / "ESRGAN" / "evil.pth"}
    for path in files.values():
        write_evil(path, marker, torch_format)
    registry = ModelRegistry(ModelPaths(models_dir=models, embeddings_dir=root / "embeddings",
                                        builtin_dir=tmp_path / "builtin"), HashCache(tmp_path / "cache.json"))
    registry.refresh()
    tool = upscalers.Upscalers(models, ModelCache(1 << 26), torch.device("cpu"))
    loaders = {
        "embedding": lambda: read_embedding(registry.find("embedding", "evil").path),
        "hypernetwork": lambda: load_hypernetwork(registry.find("hypernetwork", "evil").path, "evil"),
        "controlnet": lambda: load_controlnet(registry.find("controlnet", "evil"), torch.float32),
        "upscaler": lambda: tool.upscale(Image.new("RGB", (16, 16)), 32, 32, "evil"),
    }
    for kind, load in loaders.items():
        # ValueError: what the UI and API turn into a one-line message (ModelLoadError is one)
        with pytest.raises(ValueError) as refused:
            load()
        message = str(refused.value)
        assert "evil.pt" in message and re.search(r"unpickl|refused", message), (kind, message)
        assert "\n" not in message and len(message) < 300, (kind, message)
        assert not marker.exists(), f"the {kind} loader ran pickled code"
