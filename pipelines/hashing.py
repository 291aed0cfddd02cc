"""A1111-compatible model hashes and their cache (a1111-compat §c).

- AutoV1: sha256 of the 64 KiB at offset 1 MiB, 8 hex (old infotexts' "Model hash").
- AutoV2: sha256 of the whole file; 10 hex shown ("Model hash", checkpoint titles).
- AutoV3 (addnet): sha256 of the bytes after the safetensors header ("Lora hashes").

Hashing a multi-GB checkpoint takes seconds to minutes, so nothing here runs until a hash is
asked for, and every result is kept in cache.json (the A1111 shape, so an A1111 data dir's
cache is reused) until the file's mtime or size changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
SHA256_SECTION = "hashes"
ADDNET_SECTION = "hashes-addnet"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- the hash functions -----------------------------------------------------------------------

def _update_from(f, digest: "hashlib._Hash") -> None:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
        digest.update(chunk)


def sha256_file(path: Path | str) -> str:
    """Full-file SHA-256 (AutoV2 before shortening), streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        _update_from(f, digest)
    return digest.hexdigest()


def autov1(path: Path | str) -> str:
    """A1111's legacy model hash: sha256 of file[0x100000:0x110000], first 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def addnet_hash(path: Path | str) -> str:
    """AutoV3: sha256 of a safetensors file's data section (everything after the header)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = os.fstat(f.fileno()).st_size
        if len(prefix) < 8 or 8 + struct.unpack("<Q", prefix)[0] > size:
            raise ValueError(f"{path.name}: not a safetensors file, so it has no addnet hash")
        f.seek(8 + struct.unpack("<Q", prefix)[0])
        _update_from(f, digest)
    return digest.hexdigest()


def sha256_folder(path: Path | str) -> str:
    """A diffusers folder has no A1111 hash; ours is the sha256 of "relpath\\0sha256\\n" lines
    for every non-hidden file, sorted by relative path, so it changes when any file does."""
    root = Path(path)
    digest = hashlib.sha256()
    for relpath, file in _folder_files(root):
        digest.update(f"{relpath}\0{sha256_file(file)}\n".encode("utf-8"))
    return digest.hexdigest()


def fingerprint(path: Path | str) -> tuple[float, int]:
    """(mtime, size) of a file; for a folder the newest mtime and the total size of its files."""
    path = Path(path)
    if not path.is_dir():
        st = path.stat()
        return st.st_mtime, st.st_size
    mtime, size = path.stat().st_mtime, 0
    for _, file in _folder_files(path):
        st = file.stat()
        mtime, size = max(mtime, st.st_mtime), size + st.st_size
    return mtime, size


def _folder_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                file = Path(dirpath) / name
                files.append((file.relative_to(root).as_posix(), file))
    return sorted(files)


def _kohya_addnet_hash(path: Path) -> str | None:
    """kohya stores the AutoV3 hash as `sshs_model_hash`; A1111 trusts it instead of hashing."""
    from pipelines.probe import read_safetensors_header

    value = read_safetensors_header(path).metadata.get("sshs_model_hash", "").lower()
    return value if _HEX64.match(value) else None


def _atomic_write_text(path: Path, text: str) -> None:
    # Temp file in the same folder + os.replace: readers see the old file or the new, never half.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the cache --------------------------------------------------------------------------------

class HashCache:
    """Hashes keyed by title (`checkpoint/<relpath>`, `lora/<name>`, ...) in cache.json.

    An entry is reused while the file's mtime and size are those recorded (entries written by
    A1111 have no size; their mtime alone decides). Other sections of the file (A1111's
    "safetensors-metadata", ...) are kept as they are. Thread-safe: hashing runs outside the lock.
    """

    def __init__(self, cache_file: Path | str) -> None:
        self.cache_file = Path(cache_file)
        self._lock = threading.Lock()
        self._data: dict[str, Any] | None = None  # read on first use, not at construction

    def sha256(self, path: Path | str, title: str) -> str:
        """Full sha256 (AutoV2); folders (diffusers) hash as `sha256_folder`."""
        path = Path(path)
        return self._get(SHA256_SECTION, path, title, sha256_folder if path.is_dir() else sha256_file)

    def addnet(self, path: Path | str, title: str) -> str:
        """AutoV3 for safetensors (kohya's `sshs_model_hash` when present); other formats have
        no data section to hash, so, as in A1111, they get the full-file sha256."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            return self.sha256(path, title)
        return self._get(ADDNET_SECTION, path, title, lambda p: _kohya_addnet_hash(p) or addnet_hash(p))

    def cached_sha256(self, path: Path | str, title: str) -> str | None:
        """The sha256 if it is cached and fresh; never hashes."""
        return self._fresh(SHA256_SECTION, Path(path), title)

    def cached_addnet(self, path: Path | str, title: str) -> str | None:
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            return self.cached_sha256(path, title)
        return self._fresh(ADDNET_SECTION, path, title)

    # --- internals ----------------------------------------------------------------------------

    def _get(self, section: str, path: Path, title: str, compute: Callable[[Path], str]) -> str:
        cached = self._fresh(section, path, title)
        if cached is not None:
            return cached
        mtime, size = fingerprint(path)  # taken before hashing: a write during it makes it stale
        value = compute(path)
        with self._lock:
            data = self._loaded()
            data.setdefault(section, {})[title] = {"mtime": mtime, "size": size, "sha256": value}
            try:
                _atomic_write_text(self.cache_file, json.dumps(data, indent=4, ensure_ascii=False))
            except OSError as exc:  # a read-only data dir costs re-hashing later, nothing more
                log.warning("could not save %s: %s", self.cache_file, exc)
        return value

    def _fresh(self, section: str, path: Path, title: str) -> str | None:
        try:
            mtime, size = fingerprint(path)
        except OSError:
            return None
        with self._lock:
            entry = self._loaded().get(section, {}).get(title)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return None
        if entry.get("mtime") != mtime or ("size" in entry and entry["size"] != size):
            return None
        return entry["sha256"]

    def _loaded(self) -> dict[str, Any]:
        # Called with the lock held. A missing or damaged cache is only a cache: start empty.
        if self._data is None:
            try:
                data = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                data = {}
            self._data = data if isinstance(data, dict) else {}
            for section in (SHA256_SECTION, ADDNET_SECTION):
                if not isinstance(self._data.get(section), dict):
                    self._data[section] = {}
        return self._data
