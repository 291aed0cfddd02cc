"""Build the CLIP tokenizer files Easel ships, from the BPE merges inside the installed open_clip
package, so no tokenizer is ever downloaded from the Hub.

    .venv/bin/python tools/build_clip_tokenizer.py            # rewrites pipelines/configs/tokenizers
    .venv/bin/python tools/build_clip_tokenizer.py --out DIR  # writes DIR/clip and DIR/clip-pad-bang

Both folders hold the same 49,408-token vocabulary (BOS 49406, EOS 49407, 77 positions); they
differ only in the pad token: `clip` pads with <|endoftext|> (OpenAI CLIP-L, SD1.x and SDXL
`tokenizer`), `clip-pad-bang` pads with "!" (id 0, as OpenCLIP does: SDXL `tokenizer_2`).
The output is deterministic, so the committed files can be checked against a fresh build.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary is 49,408 = 512 byte tokens + 48,894 merges + 2 specials; the .gz file holds
# many more merges (and a header line) than CLIP uses.
MERGE_COUNT = 48_894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BANG_TOKEN = "!"
MODEL_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"  # CLIPTokenizer skips the first line of merges.txt
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "tokenizers"
# folder name -> pad token
VARIANTS = {"clip": EOS_TOKEN, "clip-pad-bang": BANG_TOKEN}


def find_bpe_file() -> Path:
    """The merges file inside the installed open_clip package, found without importing open_clip
    (its import pulls in torchvision, which Easel does not install)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("open_clip is not installed; install open_clip_torch (--no-deps is enough) "
                         "or pass --bpe PATH to bpe_simple_vocab_16e6.txt.gz")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ValueError(f"{BPE_FILE_NAME} not found in the open_clip package; reinstall open_clip_torch "
                     "or pass --bpe PATH")


def byte_symbols() -> list[str]:
    """One printable character per byte value, in GPT-2/CLIP byte-level BPE order: the bytes that
    are already visible, non-space characters map to themselves and come first (so "!" is id 0);
    the remaining bytes are shifted to code points from 256 upwards, in byte order."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    visible_set = set(visible)
    hidden = [b for b in range(256) if b not in visible_set]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def read_merges(bpe_path: Path) -> list[str]:
    """The merges CLIP uses: lines 1 .. MERGE_COUNT of the file (line 0 is a header)."""
    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:MERGE_COUNT + 1]
    if len(merges) != MERGE_COUNT or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like CLIP's BPE merges file "
                         f"(expected {MERGE_COUNT} 'a b' lines after the header)")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merges produce duplicate vocabulary entries; wrong BPE file?")
    return vocab


def tokenizer_files(vocab: dict[str, int], merges: list[str], pad_token: str) -> dict[str, str]:
    """File name -> text for one tokenizer folder."""
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN}
    config = {
        "add_prefix_space": False,
        **specials,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    return {
        "vocab.json": _json(vocab),
        "merges.txt": "\n".join([MERGES_HEADER, *merges]) + "\n",
        "tokenizer_config.json": _json(dict(sorted(config.items()))),
        "special_tokens_map.json": _json(specials),
    }


def _json(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def build(out_root: Path, bpe_path: Path | None = None) -> list[Path]:
    """Write every tokenizer variant under out_root; returns the files written."""
    merges = read_merges(bpe_path or find_bpe_file())
    vocab = build_vocab(merges)
    written = []
    for folder, pad_token in VARIANTS.items():
        target = Path(out_root) / folder
        target.mkdir(parents=True, exist_ok=True)
        for name, text in tokenizer_files(vocab, merges, pad_token).items():
            path = target / name
            path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on any OS
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder that receives clip/ and clip-pad-bang/")
    parser.add_argument("--bpe", type=Path, default=None, help=f"path to {BPE_FILE_NAME} (default: open_clip's)")
    args = parser.parse_args(argv)
    for path in build(args.out, args.bpe):
        print(path)


if __name__ == "__main__":
    main()
