"""Where the bundled diffusers config folders and the offline CLIP tokenizers live.

The folders under pipelines/configs/ are written by tools/build_configs.py and
tools/build_clip_tokenizer.py; loaders pass them as `config=` and as `tokenizer=` so diffusers
never looks anything up on the Hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.arch import Arch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_PAD_BANG = "!"


def _configs_root() -> Path:
    return Path(__file__).resolve().parent / "configs"


def config_dir(arch: Arch) -> Path:
    """The diffusers config folder (no weights, no tokenizer) for an architecture."""
    arch = Arch(arch)
    if arch is Arch.UNKNOWN:
        raise ValueError("no bundled config for an unknown architecture; probe the model file first "
                         "or pick sd1, sd2, sdxl, ...")
    return _configs_root() / arch.value


def tokenizer_dir(pad_with_bang: bool = False) -> Path:
    """The CLIP tokenizer folder: padding with <|endoftext|> (CLIP-L: SD1.x, SDXL `tokenizer`) or
    with "!" (id 0, as OpenCLIP pads: SDXL `tokenizer_2`, SD2.x)."""
    return _configs_root() / "tokenizers" / ("clip-pad-bang" if pad_with_bang else "clip")


def load_tokenizer(pad_with_bang: bool = False) -> "CLIPTokenizer":
    """A fresh CLIPTokenizer (49,408 tokens, 77 positions) read from the bundled files.

    With pad_with_bang, "!" becomes the pad token without becoming a special token. transformers
    registers every special token as an "added token" that is cut out of the text before BPE, so
    loading the folder as it is would turn "wow!!" into two bare "!" (id 0) instead of "!!</w>"
    (id 748), unlike OpenCLIP and A1111. Setting the pad token after loading keeps "!" ordinary.
    """
    from transformers import CLIPTokenizer

    folder = tokenizer_dir(pad_with_bang)
    if not pad_with_bang:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token="<|endoftext|>")
    tokenizer.pad_token = _PAD_BANG
    return tokenizer
