"""A1111 infotext: write, parse, and carry it in PNG / JPEG / WebP files.

The text format is AUTOMATIC1111's `parameters` string (see shared/reference/a1111-compat.md §b):

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>     (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

Three readers of the same text, from raw to convenient:

- `split_infotext(text)` -> (prompt, negative, params): params exactly as written (values
  unquoted, nothing added or renamed), so `format_infotext(*split_infotext(t)) == t` for any text
  A1111 wrote.
- `parse_infotext(text)`: A1111's `parse_generation_parameters` result — string values, `WxH`
  split into `Key-1`/`Key-2`, legacy "DPM++ 2M Karras" split into Sampler + Schedule type, and
  A1111's defaults for missing keys (with A1111's own types, e.g. `"Clip skip": "1"`,
  `"Masked area padding": 32`). This is what `/sdapi/v1/png-info` returns.
- `parse_infotext_typed(text)`: the same keys with numbers as int/float and flags as bool, for
  the PNG Info tab and "send to txt2img".

Deliberate differences from A1111's parser: a value written as JSON (`Hashes: {...}` from the
Civitai extension, `Civitai resources: [...]`) is read whole instead of being cut at its first
comma; an empty value is kept instead of being dropped; CRLF line ends are accepted. Flag-style
entries (`Key` alone) are dropped by the parser, as in A1111. Styles are not stripped from the
prompt, and version-based back-compat flags are not added (the engine has no use for them).
"""
from __future__ import annotations

import io
import json
import math
import re
from types import MappingProxyType
from typing import Any

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

# A1111 infotext_utils.re_param, unchanged: `Key: value` or `Key: "json string"`, comma-ended.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_VALUE_END = re.compile(r"\s*(?:,|$)")
_HYPERNET_TAG = re.compile(r"<hypernet:([^>]+)>")
# Tokens of A1111's prompt attention syntax (escapes, brackets, `:weight)`, text, stray colon).
RE_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:", re.S)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

NEGATIVE_PREFIX = "Negative prompt:"

# A1111 1.10 schedule types: (label, other spellings a legacy sampler name may end with).
SCHEDULE_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Automatic", ("automatic",)),
    ("Uniform", ("uniform",)),
    ("Karras", ("karras",)),
    ("Exponential", ("exponential",)),
    ("Polyexponential", ("polyexponential",)),
    ("SGM Uniform", ("sgm_uniform", "SGMUniform")),
    ("KL Optimal", ("kl_optimal",)),
    ("Align Your Steps", ("align_your_steps",)),
    ("Simple", ("simple",)),
    ("Normal", ("normal",)),
    ("DDIM", ("ddim",)),
    ("Beta", ("beta",)),
)

# A1111 1.10 parse_generation_parameters defaults, in its order and with its value types.
PARSE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Clip skip", "1"),
    ("Hires resize-1", 0),
    ("Hires resize-2", 0),
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
    ("Refiner switch by sampling steps", False),
)

INT_KEYS = frozenset({
    "Steps", "Seed", "Size-1", "Size-2", "Clip skip", "Hires steps", "Hires resize-1",
    "Hires resize-2", "Seed resize from-1", "Seed resize from-2", "Variation seed",
    "Masked area padding", "Mask blur", "ENSD", "First pass size-1", "First pass size-2",
})
FLOAT_KEYS = frozenset({
    "CFG scale", "Image CFG scale", "Denoising strength", "Hires upscale",
    "Variation seed strength", "Conditional mask weight", "Token merging ratio",
    "Token merging ratio hr", "Noise multiplier", "Refiner switch at", "Schedule max sigma",
    "Schedule min sigma", "Schedule rho", "Beta schedule alpha", "Beta schedule beta",
    "SGM noise multiplier", "Hypernet strength", "Eta", "Eta DDIM", "Sigma churn",
    "Sigma tmin", "Sigma tmax", "Sigma noise", "Hires CFG Scale",
})
BOOL_KEYS = frozenset({
    "Tiling", "Refiner switch by sampling steps", "Cache FP16 weight for LoRA",
    "Old prompt editing timelines", "Pad conds", "Pad conds v0", "Downcast alphas_cumprod",
    "Discard penultimate sigma", "NGMS", "Face restoration",
})

# PNG text chunks other apps write, shown raw by the PNG Info tab.
OTHER_METADATA_KEYS = (
    "fooocus_scheme", "invokeai_metadata", "invokeai_workflow", "invokeai_graph",
    "sd-metadata", "Dream", "prompt", "workflow", "Software", "Comment", "Title", "Description",
)

EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
EXIF_MAKER_NOTE = 0x927C
JPEG_EXIF_LIMIT = 65533  # one APP1 segment, its 2-byte length field included

FORMATS = MappingProxyType({"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"})


# --------------------------------------------------------------------------- writing


def quote(value: Any) -> str:
    """A1111 `infotext_utils.quote`: JSON-quote a value only when it has `,`, `:` or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(value, ensure_ascii=False)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Build the A1111 `parameters` text. `params` is written in the caller's order
    (keep `Steps` first: Civitai finds the line by it); `None` values are dropped and
    a value equal to its key is written as a bare flag."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or not key or any(c in key for c in ",:\n"):
            raise ValueError(
                f"infotext key {key!r} is not usable: use a non-empty name without ',', ':' or newlines"
            )
        parts.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative}\n{', '.join(parts)}".strip()


# --------------------------------------------------------------------------- parsing


def _scan_params(line: str) -> dict[str, Any]:
    """Read `Key: value` pairs like A1111's `re_param.findall`, except that a value that is a
    JSON object or array is read whole (and kept as the decoded object)."""
    decoder = json.JSONDecoder()
    params: dict[str, Any] = {}
    pos = 0
    while (m := RE_PARAM.search(line, pos)) is not None:
        key, value = m.group(1), m.group(2)
        start = m.start(2)
        if line[start:start + 1] in ("{", "["):
            try:
                obj, end = decoder.raw_decode(line, start)
            except ValueError:
                pass  # not JSON after all: read it the A1111 way below
            else:
                tail = _RE_VALUE_END.match(line, end)
                if tail is not None:
                    params[key] = obj
                    pos = tail.end()
                    continue
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass  # A1111 keeps a value it cannot unquote as written
        params[key] = value
        pos = m.end()  # always past pos: a match holds at least `Key:`
    return params


def split_infotext(text: str) -> tuple[str, str, dict[str, Any]]:
    """(prompt, negative prompt, params as written). The last line is the params line only if
    it holds at least 3 `Key: value` matches, as in A1111; otherwise it belongs to the prompt."""
    if not isinstance(text, str):
        raise ValueError("infotext must be a string; read it from the image first")
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), _scan_params(last)


def split_sampler_name(sampler: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); names without a schedule suffix -> (name, None).
    Suffixes match case-insensitively, longest first, and return the A1111 schedule label."""
    spellings = sorted(
        ((spelling, label) for label, others in SCHEDULE_SUFFIXES for spelling in (label, *others)),
        key=lambda item: len(item[0]),
        reverse=True,
    )
    lowered = sampler.lower()
    for spelling, label in spellings:
        suffix = " " + spelling.lower()
        if lowered.endswith(suffix) and len(sampler) > len(suffix):
            return sampler[: -len(suffix)].rstrip(), label
    return sampler, None


def _uses_emphasis(prompt: str) -> bool:
    """True when A1111's attention parser would give some text a weight other than 1
    ("(word)", "[word]", "(word:1.2)"); A1111 then defaults `Emphasis` to "Original"."""
    weights: list[float] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    for m in RE_ATTENTION.finditer(prompt):
        piece, explicit = m.group(0), m.group(1)
        if piece == "(":
            round_open.append(len(weights))
        elif piece == "[":
            square_open.append(len(weights))
        elif explicit is not None and round_open:
            scale(round_open.pop(), float(explicit) if _is_number(explicit) else 1.0)
        elif piece == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif piece == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            weights.extend(1.0 for _ in RE_BREAK.split(piece))
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    return any(w != 1.0 for w in weights)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _old_hires_first_pass(width: int, height: int) -> tuple[int, int]:
    # A1111 processing.old_hires_fix_first_pass_dimensions: ~512x512 pixels, multiples of 64.
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 `parse_generation_parameters`: `Prompt`, `Negative prompt`, each param as a string
    (`WxH` as `Key-1`/`Key-2`), legacy combined sampler names split, A1111 defaults filled."""
    prompt, negative, raw = split_infotext(text)
    res: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in raw.items():
        m = RE_IMAGE_SIZE.match(value) if isinstance(value, str) else None
        if m is not None:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value

    if isinstance(res.get("Hypernet"), str):
        res["Prompt"] += _legacy_hypernet_tags(res["Prompt"], res["Hypernet"], res.get("Hypernet strength", "1.0"))

    for sampler_key, schedule_key in (("Sampler", "Schedule type"), ("Hires sampler", "Hires schedule type")):
        if isinstance(res.get(sampler_key), str):
            sampler, schedule = split_sampler_name(res[sampler_key])
            if schedule is not None:
                res[sampler_key], res[schedule_key] = sampler, schedule

    for key, default in PARSE_DEFAULTS:
        res.setdefault(key, default)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)
    if "Emphasis" not in res and (_uses_emphasis(prompt) or _uses_emphasis(negative)):
        res["Emphasis"] = "Original"

    _restore_old_hires_fix(res)
    return res


def _legacy_hypernet_tags(prompt: str, names: str, strength: Any) -> str:
    """Tags for the legacy `Hypernet` key (A1111 before extra networks wrote one name there;
    A1111 1.x writes none and keeps `<hypernet:...>` in the prompt): one `<hypernet:name:s>` per
    comma-separated name the prompt does not already carry, so a paste never applies one twice."""
    present = {m.group(1).split(":", 1)[0].strip() for m in _HYPERNET_TAG.finditer(prompt)}
    tags = []
    for name in (n.strip() for n in names.split(",")):
        if name and name not in present:
            present.add(name)
            tags.append(f"<hypernet:{name}:{strength}>")
    return "".join(tags)


def _restore_old_hires_fix(res: dict[str, Any]) -> None:
    """Pre-1.0 infotexts: `First pass size` was the base size and `Size` the final one."""
    if "First pass size-1" not in res or "First pass size-2" not in res:
        return
    try:
        first_w, first_h = int(res["First pass size-1"]), int(res["First pass size-2"])
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    except (TypeError, ValueError):
        return
    if first_w == 0 or first_h == 0:
        first_w, first_h = _old_hires_first_pass(width, height)
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def _to_int(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() else value


def _to_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def parse_infotext_typed(text: str) -> dict[str, Any]:
    """`parse_infotext` with known numeric keys as int/float and flags as bool; a value that
    does not convert (e.g. "Seed: abc") stays a string."""
    res = parse_infotext(text)
    for key, value in res.items():
        if key in INT_KEYS:
            res[key] = _to_int(value)
        elif key in FLOAT_KEYS:
            res[key] = _to_float(value)
        elif key in BOOL_KEYS and isinstance(value, str) and value in ("True", "False"):
            res[key] = value == "True"
    return res


# --------------------------------------------------------------------------- images


def decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment -> text. The 8-byte charset prefix says how: `UNICODE\\0` is UTF-16
    (A1111/piexif write big-endian; little-endian is detected by where the zero bytes sit),
    `ASCII\\0\\0\\0` and no prefix are read as UTF-8."""
    if isinstance(raw, str):
        return raw.rstrip("\0")
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16", errors="replace").rstrip("\0")
        zeros_even = body[0::2].count(0)
        zeros_odd = body[1::2].count(0)
        encoding = "utf-16-le" if zeros_odd > zeros_even else "utf-16-be"
        return body[: len(body) // 2 * 2].decode(encoding, errors="replace").rstrip("\0")
    if prefix == b"JIS\0\0\0\0\0":
        return body.decode("shift_jis", errors="replace").rstrip("\0")
    if prefix in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return raw.decode("utf-8", errors="replace").rstrip("\0")


def _png_text(image: Image.Image) -> dict[str, Any]:
    # Text chunks after IDAT appear only once the image is loaded; `.text` does that.
    if isinstance(image, PngImagePlugin.PngImageFile):
        try:
            return dict(image.text)
        except (OSError, ValueError):
            pass
    return {}


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        exif = image.getexif()
    except (OSError, ValueError, SyntaxError):
        return None
    try:
        raw = exif.get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    except (OSError, ValueError, KeyError):
        raw = None
    if raw is None:
        raw = exif.get(EXIF_USER_COMMENT)  # Fooocus puts it in IFD0 as ASCII
    if raw is None:
        return None
    return decode_user_comment(raw) or None


def read_infotext(image: Image.Image) -> str | None:
    """The A1111 `parameters` text of an image (PNG text chunk, EXIF UserComment of
    JPEG/WebP/PNG, GIF comment), or None. Fooocus images return their `parameters` as is
    (A1111 text or Fooocus JSON, see `fooocus_scheme` in `read_other_metadata`)."""
    geninfo = (image.info or {}).get("parameters")
    if geninfo is None:
        geninfo = _png_text(image).get("parameters")  # may load the image: info grows
    info = dict(image.info or {})
    if "exif" in info:
        comment = _exif_user_comment(image)
        if comment:
            geninfo = comment  # A1111 lets the EXIF comment win when both exist
    if geninfo is None and isinstance(info.get("comment"), bytes):
        geninfo = info["comment"].decode("utf-8", errors="ignore") or None
    if isinstance(geninfo, bytes):
        geninfo = geninfo.decode("utf-8", errors="replace")
    return None if geninfo is None else str(geninfo)


def read_other_metadata(image: Image.Image) -> dict[str, str]:
    """Other apps' metadata as raw strings, for display: InvokeAI (`invokeai_*`), ComfyUI
    (`prompt`, `workflow`), Fooocus (`fooocus_scheme`), Software/Comment, ..."""
    found: dict[str, str] = {}
    sources = {**_png_text(image), **dict(image.info or {})}
    for key in OTHER_METADATA_KEYS:
        value = sources.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str) and value:
            found[key] = str(value)
    if "fooocus_scheme" not in found:
        try:
            note = image.getexif().get(EXIF_MAKER_NOTE)
        except (OSError, ValueError, SyntaxError):
            note = None
        if isinstance(note, str) and note in ("fooocus", "a1111"):
            found["fooocus_scheme"] = note
    return found


def exif_bytes_with_user_comment(infotext: str) -> bytes:
    """EXIF block exactly as A1111 writes it: UserComment = b"UNICODE\\0" + UTF-16-BE text."""
    comment = piexif.helper.UserComment.dump(infotext, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def image_bytes_with_infotext(
    image: Image.Image, infotext: str | None, fmt: str = "png", *, quality: int = 80
) -> bytes:
    """Encode `image` as png/jpeg/webp with the infotext where A1111 puts it (PNG `parameters`
    text chunk, iTXt when not latin-1; EXIF UserComment otherwise). `infotext=None` writes none.
    `quality` (A1111's default 80) applies to JPEG and WebP."""
    pil_format = FORMATS.get(str(fmt).lower())
    if pil_format is None:
        raise ValueError(f"unknown image format {fmt!r}: use png, jpeg or webp")
    out = io.BytesIO()
    if pil_format == "PNG":
        pnginfo = None
        if infotext is not None:
            pnginfo = PngImagePlugin.PngInfo()
            pnginfo.add_text("parameters", infotext)
        image.save(out, "PNG", pnginfo=pnginfo)
        return out.getvalue()

    if pil_format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")  # JPEG has no alpha; A1111 drops it the same way
    elif pil_format == "WEBP" and image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    kwargs: dict[str, Any] = {"quality": quality}
    if infotext is not None:
        exif = exif_bytes_with_user_comment(infotext)
        if pil_format == "JPEG" and len(exif) > JPEG_EXIF_LIMIT:
            raise ValueError(
                f"infotext is too long for JPEG EXIF ({len(infotext)} characters, about 32,000 fit): save as PNG"
            )
        kwargs["exif"] = exif
    image.save(out, pil_format, **kwargs)
    return out.getvalue()
