"""The offline CLIP tokenizers: known ids, padding, the generator, and agreement with OpenCLIP's
own reference tokenizer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import configs
from tools import build_clip_tokenizer

BOS, EOS = 49406, 49407
FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]

# Prompts that exercise case, punctuation runs, apostrophes, digits, A1111 syntax and non-ASCII text.
SAMPLE_TEXTS = [
    "a photo of a cat",
    "Hello, WORLD!!  it's a   test!",
    "masterpiece, best quality, (red hair:1.2), [blue eyes], 1girl <lora:foo:0.8>",
    "1024x768 at 2.5 cfg; steps=30 -- DPM++ 2M Karras",
    "café naïve façade, Tōkyō 東京タワー, 😀🎨",
    "don't, won't, we'll, I'm, you're, they've",
]


@pytest.fixture(scope="module")
def clip():
    return configs.load_tokenizer()


@pytest.fixture(scope="module")
def clip_bang():
    return configs.load_tokenizer(pad_with_bang=True)


def test_known_ids(clip, clip_bang):
    for tokenizer in (clip, clip_bang):
        assert tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
        assert len(tokenizer) == 49408
        assert tokenizer.model_max_length == 77


def test_clip_pads_with_end_of_text(clip):
    ids = clip("a photo of a cat", padding="max_length", max_length=clip.model_max_length).input_ids
    assert ids == [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71


def test_clip_pad_bang_pads_with_id_zero(clip_bang):
    ids = clip_bang("a photo of a cat", padding="max_length", max_length=clip_bang.model_max_length).input_ids
    assert ids == [BOS, 320, 1125, 539, 320, 2368, EOS] + [0] * 70
    assert clip_bang.pad_token == "!"


def test_bang_in_prompt_is_ordinary_text(clip, clip_bang):
    # "!" pads, but inside a prompt it merges like any other character, as in OpenCLIP/A1111
    for text in ("wow!!", "a cat!", "!"):
        assert clip_bang(text).input_ids == clip(text).input_ids
    assert clip_bang("wow!!").input_ids == [BOS, 2781, 748, EOS]
    assert 0 not in clip_bang("a cat! wow!!! !").input_ids


def test_truncates_to_77(clip):
    ids = clip("cat " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS


def test_tokenizer_dirs():
    assert configs.tokenizer_dir().name == "clip"
    assert configs.tokenizer_dir(pad_with_bang=True).name == "clip-pad-bang"
    for folder in (configs.tokenizer_dir(), configs.tokenizer_dir(True)):
        assert sorted(p.name for p in folder.iterdir()) == FILES


def test_committed_files_match_the_recipe():
    folder = configs.tokenizer_dir()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    # each merge produces the vocabulary entry right after the 512 byte tokens
    assert vocab["".join(merges[1].split())] == 512
    assert vocab["".join(merges[-1].split())] == 512 + 48893
    for name in ("clip", "clip-pad-bang"):
        config = json.loads((configs.tokenizer_dir(name == "clip-pad-bang") / "tokenizer_config.json").read_text())
        assert config["model_max_length"] == 77
        assert config["pad_token"] == ("!" if name == "clip-pad-bang" else "<|endoftext|>")


def test_generator_reproduces_committed_files(tmp_path):
    build_clip_tokenizer.build(tmp_path)
    for variant in ("clip", "clip-pad-bang"):
        committed = configs.tokenizer_dir(variant == "clip-pad-bang")
        assert sorted(p.name for p in (tmp_path / variant).iterdir()) == FILES
        for name in FILES:
            assert (tmp_path / variant / name).read_bytes() == (committed / name).read_bytes(), f"{variant}/{name}"


def test_generator_rejects_a_wrong_bpe_file(tmp_path):
    import gzip

    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(gzip.compress(b"header\ni n\nt h\n"))
    with pytest.raises(ValueError, match="BPE merges"):
        build_clip_tokenizer.build(tmp_path / "out", bad)


_REFERENCE_SCRIPT = """
import importlib.util, json, sys, types
# open_clip's tokenizer module only needs ftfy for mojibake repair (the sample texts have none)
# and torch for annotations and batch tensors; stubs keep this subprocess quick.
sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda text: text)
class _AnyAttribute(types.ModuleType):
    def __getattr__(self, name):
        return object
sys.modules["torch"] = _AnyAttribute("torch")
spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
tokenizer = module.SimpleTokenizer()
print(json.dumps([tokenizer.encode(text) for text in json.loads(sys.argv[2])]))
"""


def test_agrees_with_open_clip_reference_tokenizer(clip):
    """OpenCLIP's SimpleTokenizer (the code SD was trained with) run from its source file, in a
    subprocess because open_clip's package import needs torchvision."""
    reference_source = Path(build_clip_tokenizer.find_bpe_file()).parent / "tokenizer.py"
    if not reference_source.is_file():
        pytest.skip("open_clip's tokenizer.py is not installed")
    result = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(reference_source), json.dumps(SAMPLE_TEXTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [clip(text, add_special_tokens=False).input_ids for text in SAMPLE_TEXTS]
    assert ours == expected
