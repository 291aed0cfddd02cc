"""The built-in prompts-from-file extension: A1111 line syntax, seeds, and every line's image equal
to the single generation with the same settings."""
import importlib

import numpy as np
import pytest

import app
from extensions.loader import load_extensions
from pipelines.generate import generate
from pipelines.request import GenerationRequest

BASE = dict(prompt="unused", width=64, height=64, steps=2, cfg_scale=5, sampler="Euler",
            checkpoint="tinyA.safetensors", seed=11, save_images=False)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    exts = load_extensions(app.BUILTIN_EXTENSIONS_DIR, tmp_path_factory.mktemp("none"))
    assert exts.find("prompts-from-file").loaded, exts.find("prompts-from-file").error
    return importlib.import_module("easel_ext_prompts_from_file.batch")


def test_lines_parse_like_a1111(batch):
    assert batch.parse_line("  a plain prompt, with commas ") == {"prompt": "a plain prompt, with commas"}
    assert batch.parse_line('--prompt "a cat" --negative_prompt "blur, bad" --steps 3 --cfg_scale 4.5 '
                            '--sampler_name "Euler a" --seed 9 --n_iter 2') == {
        "prompt": "a cat", "negative_prompt": "blur, bad", "steps": 3, "cfg_scale": 4.5,
        "sampler": "Euler a", "seed": 9, "batch_count": 2}
    with pytest.raises(ValueError, match="line 4: unknown option '--tiling'"):
        batch.parse_line("--prompt x --tiling 1", 4)
    with pytest.raises(ValueError, match="line 2: --steps 'many' is not a int"):
        batch.parse_line("--steps many", 2)
    base = GenerationRequest(**BASE)
    with pytest.raises(ValueError, match="line 2: steps must be between"):
        batch.requests_from_text(base, "ok\n--steps 0\n")
    with pytest.raises(ValueError, match="no prompts"):
        batch.requests_from_text(base, "\n  \n")


def test_seeds_fixed_or_iterated(batch):
    base = GenerationRequest(**{**BASE, "seed": -1})
    same = batch.requests_from_text(base, "a\nb\n")
    assert same[0].seed == same[1].seed != -1
    stepped = batch.requests_from_text(base.with_changes(seed=100), "a\n--prompt b --n_iter 2\nc\n--seed 5 --prompt d\n",
                                       iterate_seed=True)
    assert [r.seed for r in stepped] == [100, 101, 103, 5]


def test_each_line_equals_its_single_generation(engine, batch):
    manager, _ = engine
    requests = batch.requests_from_text(GenerationRequest(**BASE), "a red circle\n--prompt \"a blue square\" --steps 1\n")
    results = batch.run_lines(requests, lambda r: generate(manager, None, r))
    singles = [generate(manager, None, GenerationRequest(**{**BASE, "prompt": "a red circle"})),
               generate(manager, None, GenerationRequest(**{**BASE, "prompt": "a blue square", "steps": 1}))]
    for got, want in zip(results, singles):
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
    assert results[0].images[0].tobytes() != results[1].images[0].tobytes()
