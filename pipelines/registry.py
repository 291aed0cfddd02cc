"""ModelRegistry: what is in the models folders, read in the A1111 layout (a1111-compat §a).

A scan stats files and reads safetensors headers only (architecture, metadata); it never loads
tensors and never hashes. Hashes are computed on first use through the HashCache and kept in
cache.json. A file that cannot be read is listed in `skipped` with the reason, never fatal.

Look-ups (`find`) accept what A1111 users and clients send: the label, the name (relative path
with extension), the name without extension, the file stem, A1111's `model_name` (`sub_model`),
a title `name [hash]`, a short hash (10 hex, AutoV2) or a full sha256, and for checkpoints the
legacy AutoV1 hash (8 hex). Hash look-ups consult only hashes already in the cache (AutoV1,
a 64 KiB read, is computed on demand): hashing every file to resolve one name would take
minutes on a real models folder, and A1111 behaves the same way.
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from pipelines import hashing, probe
from pipelines.arch import Arch
from pipelines.hashing import HashCache

KINDS = ("checkpoint", "vae", "lora", "embedding", "controlnet", "hypernetwork")
TINYWORLD_LABEL = "tiny-world (built-in, 64px demo)"

_KIND_LABELS = {"checkpoint": "Checkpoint", "vae": "VAE", "lora": "LoRA", "embedding": "Embedding",
                "controlnet": "ControlNet model", "hypernetwork": "Hypernetwork"}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SIDECAR_VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")
# Metadata A1111 drops before showing it: images as base64, megabytes each.
_BULKY_METADATA = ("ssmd_cover_images", "modelspec.thumbnail")
_TITLE_WITH_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
_HEX = re.compile(r"^[0-9a-fA-F]{8,64}$")


class ModelNotFoundError(ValueError):
    """A name that matches no model; the message lists what there is."""


@dataclass(frozen=True)
class ModelPaths:
    models_dir: Path
    embeddings_dir: Path
    builtin_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.models_dir / "Stable-diffusion"

    @property
    def vae(self) -> Path:
        return self.models_dir / "VAE"

    @property
    def lora(self) -> tuple[Path, Path]:
        # A1111 still scans the legacy LyCORIS folder beside Lora.
        return self.models_dir / "Lora", self.models_dir / "LyCORIS"

    @property
    def controlnet(self) -> Path:
        return self.models_dir / "ControlNet"

    @property
    def hypernetworks(self) -> Path:
        return self.models_dir / "hypernetworks"

    def roots(self, kind: str) -> tuple[Path, ...]:
        """The folders scanned for one kind of model."""
        table = {"checkpoint": (self.checkpoints,), "vae": (self.vae,), "lora": self.lora,
                 "embedding": (self.embeddings_dir,), "controlnet": (self.controlnet,),
                 "hypernetwork": (self.hypernetworks,)}
        return table[_check_kind(kind)]


@dataclass(frozen=True)
class ModelEntry:
    kind: str
    name: str  # relative to its folder, with extension, "/" separators
    path: Path
    format: str  # "safetensors" | "diffusers" | "ckpt" (any pickle: .ckpt/.pt/.pth/.bin)
    arch: Arch
    size: int
    mtime: float
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    builtin: bool = False
    label: str = ""  # what the UI shows; the name unless set
    sidecar_vae: Path | None = None  # checkpoints: `<stem>.vae.safetensors|pt|ckpt` beside it

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def stem(self) -> str:
        """File name without folder and extension (what `<lora:stem:1>` and infotexts use)."""
        base = self.name.rsplit("/", 1)[-1]
        return base if self.format == "diffusers" else base.rsplit(".", 1)[0]

    @property
    def name_without_extension(self) -> str:
        return self.name if self.format == "diffusers" else self.name.rsplit(".", 1)[0]

    @property
    def model_name(self) -> str:
        """A1111's `model_name`: the name without extension, folders joined by `_`."""
        return self.name_without_extension.replace("/", "_")


@dataclass(frozen=True)
class _Catalog:
    entries: Mapping[str, tuple[ModelEntry, ...]]
    skipped: Mapping[Path, str]


class ModelRegistry:
    """The models on disk. `refresh()` rescans; the lists are sorted (natural, case-insensitive),
    built-in checkpoints after the user's. Safe to read from several threads while refreshing."""

    def __init__(self, paths: ModelPaths, hashes: HashCache,
                 read_header: Callable[[Path], probe.SafetensorsHeader] = probe.read_safetensors_header) -> None:
        self.paths = paths
        self.hashes = hashes
        self._read_header = read_header
        self._catalog: _Catalog | None = None
        self._refresh_lock = threading.Lock()
        self._autov1_lock = threading.Lock()
        self._autov1: dict[tuple[str, float, int], str] = {}
        # LoRA / embedding / hypernetwork headers by (path, mtime, size), kept from one refresh to
        # the next (folders of thousands of LoRAs rescan with stats only); only the files seen by
        # the last scan stay in it.
        self._headers: dict[tuple[str, float, int], probe.SafetensorsHeader] = {}

    # --- scanning ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan every folder. Never hashes; unreadable files land in `skipped`."""
        with self._refresh_lock:
            skipped: dict[Path, str] = {}
            headers: dict[tuple[str, float, int], probe.SafetensorsHeader] = {}
            cached = functools.partial(self._cached_header, headers)
            entries = {
                "checkpoint": tuple(_sorted(_scan_checkpoints(self.paths.checkpoints, skipped, self._read_header))
                                    + _sorted(_scan_builtins(self.paths.builtin_dir, skipped, self._read_header))),
                "vae": tuple(_sorted(_scan_vaes(self.paths.vae, skipped, self._read_header))),
                "lora": tuple(_sorted(_scan_loras(self.paths.lora, skipped, cached))),
                "embedding": tuple(_sorted(_scan_simple(
                    "embedding", self.paths.embeddings_dir, (".pt", ".bin", ".safetensors"),
                    probe.probe_embedding, skipped, cached))),
                "controlnet": tuple(_sorted(_scan_controlnets(self.paths.controlnet, skipped, self._read_header))),
                "hypernetwork": tuple(_sorted(_scan_simple(
                    "hypernetwork", self.paths.hypernetworks, (".pt", ".safetensors"), None, skipped, cached))),
            }
            self._headers = headers
            self._catalog = _Catalog(entries=entries, skipped=skipped)

    def _cached_header(self, fresh: dict, path: Path) -> probe.SafetensorsHeader:
        """The header from the previous scan while the file's (mtime, size) are unchanged; read
        (and remembered in `fresh`, this scan's cache) otherwise. Unreadable files are not cached."""
        mtime, size = hashing.fingerprint(path)
        key = (str(path), mtime, size)
        header = self._headers.get(key) or fresh.get(key)
        if header is None:
            header = self._read_header(path)
        fresh[key] = header
        return header

    @property
    def skipped(self) -> dict[Path, str]:
        """Files the last scan could not use, with the reason."""
        return dict(self._current().skipped)

    def _current(self) -> _Catalog:
        if self._catalog is None:  # the first look-up scans when nobody called refresh()
            self.refresh()
        assert self._catalog is not None
        return self._catalog

    # --- listing ----------------------------------------------------------------------------

    def entries(self, kind: str) -> list[ModelEntry]:
        return list(self._current().entries[_check_kind(kind)])

    def checkpoints(self) -> list[ModelEntry]:
        return self.entries("checkpoint")

    def vaes(self) -> list[ModelEntry]:
        return self.entries("vae")

    def loras(self) -> list[ModelEntry]:
        return self.entries("lora")

    def embeddings(self) -> list[ModelEntry]:
        return self.entries("embedding")

    def controlnets(self) -> list[ModelEntry]:
        return self.entries("controlnet")

    def hypernetworks(self) -> list[ModelEntry]:
        return self.entries("hypernetwork")

    def default_checkpoint(self) -> ModelEntry | None:
        """The first user checkpoint that can be a main model (not a refiner, not an
        unrecognised safetensors), else the built-in, else any checkpoint at all."""
        checkpoints = self.checkpoints()
        user = [e for e in checkpoints if not e.builtin]
        usable = [e for e in user if e.format == "ckpt" or e.arch not in (Arch.UNKNOWN, Arch.SDXL_REFINER)]
        builtin = [e for e in checkpoints if e.builtin]
        for candidates in (usable, builtin, user):
            if candidates:
                return candidates[0]
        return None

    # --- hashes -----------------------------------------------------------------------------

    def hash_title(self, entry: ModelEntry) -> str:
        """The cache.json key: A1111's `checkpoint/<relpath>` style."""
        return f"builtin/{entry.kind}/{entry.name}" if entry.builtin else f"{entry.kind}/{entry.name}"

    def sha256(self, entry: ModelEntry) -> str:
        """Full sha256 (AutoV2), hashing the file now if the cache has no fresh value."""
        return self.hashes.sha256(entry.path, self.hash_title(entry))

    def shorthash(self, entry: ModelEntry) -> str:
        """A1111 `shorthash`: the first 10 hex of the sha256 ("Model hash" in infotexts)."""
        return self.sha256(entry)[:10]

    def cached_sha256(self, entry: ModelEntry) -> str | None:
        """The sha256 if already known; never hashes."""
        return self.hashes.cached_sha256(entry.path, self.hash_title(entry))

    def addnet_hash(self, entry: ModelEntry) -> str:
        """AutoV3 for LoRAs ("Lora hashes" shows its first 12 hex)."""
        return self.hashes.addnet(entry.path, self.hash_title(entry))

    def autov1(self, entry: ModelEntry) -> str:
        """A1111's legacy 8-hex model hash (64 KiB read), memoised per file state."""
        key = (str(entry.path), entry.mtime, entry.size)
        with self._autov1_lock:
            known = self._autov1.get(key)
        if known is None:
            known = hashing.autov1(entry.path)
            with self._autov1_lock:
                self._autov1[key] = known
        return known

    def title(self, entry: ModelEntry) -> str:
        """A1111 title: `name [shorthash]` once the hash is known, else just the name.
        Never hashes, so listing titles stays instant."""
        known = self.cached_sha256(entry)
        return f"{entry.name} [{known[:10]}]" if known else entry.name

    def infotext_title(self, kind: str, name: str) -> str:
        """A second model as A1111's infotext names it (Refiner, Hires checkpoint):
        `name [shorthash]`, hashing it if needed; the name as given when it is not here."""
        try:
            entry = self.find(kind, name)
        except ValueError:
            return name
        return f"{entry.name_without_extension} [{self.shorthash(entry)}]"

    # --- look-up ----------------------------------------------------------------------------

    def find(self, kind: str, name: str) -> ModelEntry:
        """The entry `name` designates (see the module doc for what is accepted)."""
        entries = self.entries(kind)
        query = (name or "").strip().replace("\\", "/")
        found = self._find_by_alias(entries, query) if query else None
        if found is None and query:
            titled = _TITLE_WITH_HASH.match(query)
            if titled:
                found = (self._find_by_alias(entries, titled["name"])
                         or self._find_by_hash(kind, entries, titled["hash"]))
            elif _HEX.match(query):
                found = self._find_by_hash(kind, entries, query)
        if found is None:
            raise ModelNotFoundError(self._skipped_message(kind, query)
                                     or self._not_found_message(kind, name, entries))
        return found

    @staticmethod
    def _find_by_alias(entries: list[ModelEntry], query: str) -> ModelEntry | None:
        tiers: tuple[Callable[[ModelEntry], tuple[str, ...]], ...] = (
            lambda e: (e.label, e.name),
            lambda e: (e.name_without_extension, e.stem, e.model_name, e.metadata.get("ss_output_name", "")),
        )
        for aliases in tiers:
            for entry in entries:
                if query in aliases(entry):
                    return entry
        folded = query.casefold()
        for aliases in tiers:
            for entry in entries:
                if folded in (a.casefold() for a in aliases(entry) if a):
                    return entry
        return None

    def _find_by_hash(self, kind: str, entries: list[ModelEntry], query: str) -> ModelEntry | None:
        query = query.lower()
        for entry in entries:
            known = [self.cached_sha256(entry)]
            if kind == "lora":
                known.append(self.hashes.cached_addnet(entry.path, self.hash_title(entry)))
            if any(k and k.startswith(query) for k in known):
                return entry
        if kind == "checkpoint" and len(query) == 8:
            for entry in entries:
                if entry.format != "diffusers" and self._safe_autov1(entry) == query:
                    return entry
        return None

    def _safe_autov1(self, entry: ModelEntry) -> str | None:
        try:
            return self.autov1(entry)
        except OSError:
            return None

    def _skipped_message(self, kind: str, query: str) -> str | None:
        """Why a file the user can see in the folder is not usable, if the query names one."""
        for path, reason in self._current().skipped.items():
            for root in self.paths.roots(kind) + ((self.paths.builtin_dir,) if kind == "checkpoint" else ()):
                if path.is_relative_to(root):
                    name = path.relative_to(root).as_posix()
                    if query in (name, name.rsplit(".", 1)[0], path.stem):
                        return f"{_KIND_LABELS[kind]} '{query}' was skipped by the scan: {reason}"
        return None

    def _not_found_message(self, kind: str, name: str, entries: list[ModelEntry]) -> str:
        what = _KIND_LABELS[kind]
        if not entries:
            folders = " or ".join(str(p) for p in self.paths.roots(kind))
            return f"{what} '{name}' not found: there are none in {folders}. Add files there and press refresh."
        labels = [e.label for e in entries]
        shown = ", ".join(labels[:10]) + (f" (and {len(labels) - 10} more)" if len(labels) > 10 else "")
        return f"{what} '{name}' not found. Press refresh after adding files, or pick one of: {shown}"


# --- scanning helpers -------------------------------------------------------------------------

def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind '{kind}'; use one of {', '.join(KINDS)}")
    return kind


def _natural_key(entry: ModelEntry) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", entry.name.casefold())]


def _sorted(entries: Iterator[ModelEntry]) -> list[ModelEntry]:
    return sorted(entries, key=_natural_key)


def _walk(root: Path, suffixes: tuple[str, ...], folder_marker: str | None) -> Iterator[Path]:
    """Model files (and folders holding `folder_marker`) under root, hidden ones left out.
    Symlinked folders are followed (users link model stores in), each real folder once."""
    if not root.is_dir():
        return
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        here = Path(dirpath)
        if folder_marker and here != root and folder_marker in filenames:
            dirnames[:] = []  # a diffusers folder is one model; its files are not listed apart
            yield here
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith(".") and filename.lower().endswith(suffixes):
                yield here / filename


def _file_entry(kind: str, root: Path, path: Path, arch: Arch, metadata: Mapping[str, str],
                **extra) -> ModelEntry:
    mtime, size = hashing.fingerprint(path)
    fmt = "diffusers" if path.is_dir() else "ckpt" if path.suffix.lower() in _PICKLE_SUFFIXES else "safetensors"
    return ModelEntry(kind=kind, name=path.relative_to(root).as_posix(), path=path, format=fmt, arch=arch,
                      size=size, mtime=mtime, metadata=metadata, **extra)


ReadHeader = Callable[[Path], probe.SafetensorsHeader]


def _public_metadata(header: probe.SafetensorsHeader) -> dict[str, str]:
    return {k: v for k, v in header.metadata.items() if k not in _BULKY_METADATA}


def _guarded(path: Path, skipped: dict[Path, str], make: Callable[[], ModelEntry | None]) -> Iterator[ModelEntry]:
    """Run one entry's probe; a damaged or unreadable file is recorded, not raised."""
    try:
        entry = make()
    except (OSError, ValueError) as exc:
        skipped[path] = str(exc) or exc.__class__.__name__
        return
    if entry is not None:
        yield entry


def _find_sidecar_vae(checkpoint: Path) -> Path | None:
    stem = checkpoint.name.rsplit(".", 1)[0]
    for suffix in _SIDECAR_VAE_SUFFIXES:
        candidate = checkpoint.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _scan_checkpoints(root: Path, skipped: dict[Path, str], read_header: ReadHeader) -> Iterator[ModelEntry]:
    for path in _walk(root, (".safetensors", ".ckpt"), "model_index.json"):
        if path.name.lower().endswith(_SIDECAR_VAE_SUFFIXES):
            continue  # a sidecar VAE belongs to its checkpoint's entry

        def make(path: Path = path) -> ModelEntry:
            if path.is_dir():
                return _file_entry("checkpoint", root, path, probe.probe_diffusers_folder(path), {})
            if path.suffix.lower() == ".ckpt":  # pickles are not opened during a scan
                return _file_entry("checkpoint", root, path, Arch.UNKNOWN, {},
                                   sidecar_vae=_find_sidecar_vae(path))
            header = read_header(path)
            arch = probe.probe_checkpoint(header)
            if arch is Arch.SD2 and probe.read_v_parameterization_sidecar(path):
                arch = Arch.SD2_V
            return _file_entry("checkpoint", root, path, arch, _public_metadata(header),
                               sidecar_vae=_find_sidecar_vae(path))

        yield from _guarded(path, skipped, make)


def _scan_builtins(root: Path, skipped: dict[Path, str], read_header: ReadHeader) -> Iterator[ModelEntry]:
    for path in _walk(root, (".safetensors",), None):
        if path.parent != root:  # subfolders hold the family's VAE/LoRA/embedding/ControlNet files
            continue
        def make(path: Path = path) -> ModelEntry:
            header = read_header(path)
            arch = probe.probe_checkpoint(header)
            name = path.relative_to(root).as_posix()
            label = TINYWORLD_LABEL if arch is Arch.TINYWORLD else f"{name} (built-in)"
            return _file_entry("checkpoint", root, path, arch, _public_metadata(header),
                               builtin=True, label=label)

        yield from _guarded(path, skipped, make)


def _scan_vaes(root: Path, skipped: dict[Path, str], read_header: ReadHeader) -> Iterator[ModelEntry]:
    for path in _walk(root, (".safetensors", ".pt", ".ckpt"), "config.json"):
        def make(path: Path = path) -> ModelEntry | None:
            if path.is_dir():
                _require_vae_folder(path)
                return _file_entry("vae", root, path, Arch.UNKNOWN, {})
            if path.suffix.lower() != ".safetensors":  # pickles are not opened during a scan
                return _file_entry("vae", root, path, Arch.UNKNOWN, {})
            header = read_header(path)
            if not probe.probe_vae(header):
                raise ValueError(f"{path.name}: no encoder/decoder weights, so not a VAE; "
                                 "move it to the folder of its kind")
            # One VAE architecture serves SD1, SD2 and SDXL; the checkpoint decides the config.
            return _file_entry("vae", root, path, Arch.UNKNOWN, _public_metadata(header))

        yield from _guarded(path, skipped, make)


def _require_vae_folder(path: Path) -> None:
    config = _read_config(path)
    class_name = str(config.get("_class_name", ""))
    if "Autoencoder" not in class_name:
        raise ValueError(f"{path.name}: a {class_name or 'diffusers'} folder, not a VAE; "
                         "move it to the folder of its kind")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name}/config.json is not readable JSON") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path.name}/config.json is not a JSON object")
    return config


def _scan_loras(roots: tuple[Path, ...], skipped: dict[Path, str], read_header: ReadHeader) -> Iterator[ModelEntry]:
    seen: set[str] = set()
    for root in roots:
        for entry in _scan_simple("lora", root, (".safetensors", ".pt", ".ckpt"), probe.probe_lora_base, skipped,
                                  read_header):
            if entry.name in seen:  # the same name in Lora and LyCORIS: Lora wins, as listed first
                skipped[entry.path] = f"{entry.name}: a LoRA of the same name is already in {roots[0]}"
                continue
            seen.add(entry.name)
            yield entry


def _scan_controlnets(root: Path, skipped: dict[Path, str], read_header: ReadHeader) -> Iterator[ModelEntry]:
    suffixes = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
    for path in _walk(root, suffixes, "config.json"):
        def make(path: Path = path) -> ModelEntry:
            if path.is_dir():
                return _file_entry("controlnet", root, path, _controlnet_folder_arch(path), {})
            if path.suffix.lower() != ".safetensors":
                return _file_entry("controlnet", root, path, Arch.UNKNOWN, {})
            header = read_header(path)
            return _file_entry("controlnet", root, path, probe.probe_controlnet(header), _public_metadata(header))

        yield from _guarded(path, skipped, make)


def _controlnet_folder_arch(path: Path) -> Arch:
    dims = {768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL}
    return dims.get(_read_config(path).get("cross_attention_dim"), Arch.UNKNOWN)


def _scan_simple(kind: str, root: Path, suffixes: tuple[str, ...],
                 probe_header: Callable[[probe.SafetensorsHeader], Arch] | None,
                 skipped: dict[Path, str], read_header: ReadHeader) -> Iterator[ModelEntry]:
    for path in _walk(root, suffixes, None):
        def make(path: Path = path) -> ModelEntry:
            if path.suffix.lower() != ".safetensors":
                return _file_entry(kind, root, path, Arch.UNKNOWN, {})
            header = read_header(path)
            arch = probe_header(header) if probe_header else Arch.UNKNOWN
            return _file_entry(kind, root, path, arch, _public_metadata(header))

        yield from _guarded(path, skipped, make)
