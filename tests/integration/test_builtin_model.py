"""The built-in tiny-world checkpoint is what a fresh install opens with: listed last, chosen
when the models folder is empty, and loaded through the normal single-file path."""
import numpy as np

from pipelines.arch import Arch
from pipelines.generate import generate
from pipelines.request import GenerationRequest
from pipelines.settings import Settings
from tests.integration.conftest import make_engine


def test_builtin_tiny_world_is_the_default_and_generates(tmp_path):
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    builtin_dir = Settings(data_dir=tmp_path / "data").paths().builtin_dir  # as the app has it
    manager, _ = make_engine(tmp_path, tmp_path / "data", builtin_dir=builtin_dir)
    entry = manager.registry.default_checkpoint()
    assert entry.builtin and entry.arch is Arch.TINYWORLD
    assert entry.label == "tiny-world (built-in, 64px demo)"
    request = GenerationRequest(prompt="a blue circle on a yellow background", width=64, height=64,
                                steps=8, cfg_scale=5, seed=3, sampler="Euler a", save_images=False)
    first = generate(manager, None, request).images[0]
    again = generate(manager, None, request).images[0]
    assert first.tobytes() == again.tobytes()
    # a trained model paints flat regions: the border is nearly one colour, unlike noise
    border = np.concatenate([np.asarray(first)[0], np.asarray(first)[-1]]).astype(float)
    assert border.std(axis=0).mean() < 40
