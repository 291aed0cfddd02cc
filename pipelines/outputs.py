"""Saving files so that a crash never leaves a half-written one, and naming outputs like A1111.

Atomic writes go to a hidden temporary file in the target's folder, are fsync'ed, then moved
over the target with `os.replace` (or hard-linked into place when overwriting is not allowed),
so readers see the old file or the new one, never a mix. The temporary file is removed on any
failure.

`OutputStore` writes `root/<category>/<YYYY-MM-DD>/<NNNNN>-<seed>.<ext>` where NNNNN is one more
than the highest number already in that folder (A1111's `get_next_sequence_number`), starting at
00000, and never overwrites a file, even one another process wrote meanwhile. With a history
index (pipelines/history.py) each saved image is recorded with its owner; `for_owner(owner)` is
the store as one job's generation sees it. `recover()` runs on start: a process killed while
saving leaves only a hidden `.<name>.<hex>.tmp` (never a partial image), and this removes them.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import threading
import uuid
import zlib
from collections.abc import Callable
from datetime import date
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from PIL import Image

from pipelines.metadata import image_bytes_with_infotext

OUTPUT_CATEGORIES = frozenset({
    "txt2img-images", "img2img-images", "extras-images",
    "txt2img-grids", "img2img-grids", "init-images",
})
EXTENSIONS = MappingProxyType({"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"})
RE_NUMBERED = re.compile(r"^(\d{5,})-")
RE_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # atomic_write's temporary names
MAX_NAME_ATTEMPTS = 1000
OWNER_CHUNK = "easel_owner"  # PNG text chunk with a logged-in owner (pipelines/history.py)
log = logging.getLogger("easel.outputs")

# Filesystems without hard links (FAT, some network mounts) answer with one of these.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, overwrite: bool = True) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then put it in place atomically.
    With `overwrite=False` an existing `path` raises FileExistsError and is left untouched.
    Creates missing parent folders. Returns the final path."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open with 0o666 lets the umask decide permissions, like a plain open() would.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            _move_without_overwrite(temp, path)
    except BaseException:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


def _move_without_overwrite(temp: Path, path: Path) -> None:
    try:
        os.link(temp, path)  # fails atomically if `path` exists, whoever created it
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(temp, path)
        return
    temp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda handle: handle.write(data), overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    # Serialise first: an unserialisable object must fail before the old file is touched.
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _extension(fmt: str) -> str:
    ext = EXTENSIONS.get(str(fmt).lower())
    if ext is None:
        raise ValueError(f"unknown image format {fmt!r}: use png, jpeg or webp")
    return ext


def next_sequence_number(folder: Path) -> int:
    """1 + the highest `NNNNN-` prefix among the folder's files; 0 for an empty or missing folder."""
    highest = -1
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = RE_NUMBERED.match(entry.name)
        if m is not None:
            highest = max(highest, int(m.group(1)))
    return highest + 1


def sweep_stale_temps(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files a killed atomic_write left behind (`.<name>.<12 hex>.tmp`);
    returns them. Run on start, before anything writes (another Easel on the same data dir
    would lose a save in progress)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    candidates = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
    removed = []
    for path in candidates:
        if RE_TEMP.match(path.name) and path.is_file():
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


def png_with_text(data: bytes, key: str, value: str) -> bytes:
    """PNG bytes with one more tEXt chunk, placed before the image data (readers see it from
    the header alone). `value` must be latin-1."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not PNG data")
    body = key.encode("latin-1") + b"\0" + value.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            return data[:offset] + chunk + data[offset:]
        offset += 12 + length
    raise ValueError("PNG data without image data")


class OutputStore:
    """Writes generated images under `root`, one folder per category and day; records each in
    `history` (a pipelines.history.HistoryIndex) when given."""

    def __init__(self, root: str | os.PathLike, today: Callable[[], date] = date.today, history: Any = None):
        self.root = Path(root)
        self.history = history
        self._today = today
        self._lock = threading.Lock()

    def for_owner(self, owner: str | None) -> "OwnedOutputs":
        """This store, saving as `owner` (what one job's generate() gets)."""
        return OwnedOutputs(self, owner)

    def recover(self) -> list[Path]:
        """On start: sweep the temporary files of interrupted saves, then bring the history
        index up to date with the files. Returns the removed temporary files."""
        removed = sweep_stale_temps(self.root)
        for path in removed:
            log.info("removed %s, left by a save that did not finish", path)
        if self.history is not None:
            log.info("history index: %s", self.history.load_or_rebuild())
        return removed

    def folder(self, category: str) -> Path:
        if category not in OUTPUT_CATEGORIES:
            raise ValueError(
                f"unknown output category {category!r}: use one of {', '.join(sorted(OUTPUT_CATEGORIES))}"
            )
        return self.root / category / self._today().isoformat()

    def save(
        self,
        image: Image.Image,
        *,
        category: str,
        seed: int,
        infotext: str | None,
        fmt: str = "png",
        owner: str | None = None,
    ) -> Path:
        """Save `image` with its infotext as `<NNNNN>-<seed>.<ext>`; returns the new file's path.
        A logged-in `owner` ("user:<login>") is written into a PNG too (see pipelines/history.py)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        folder = self.folder(category)
        ext = _extension(fmt)
        data = image_bytes_with_infotext(image, infotext, fmt)
        if ext == "png" and owner and owner.startswith("user:") and owner.isascii():
            data = png_with_text(data, OWNER_CHUNK, owner)
        with self._lock:
            number = next_sequence_number(folder)
            for _ in range(MAX_NAME_ATTEMPTS):
                path = folder / f"{number:05d}-{seed}.{ext}"
                try:
                    atomic_write_bytes(path, data, overwrite=False)
                except FileExistsError:
                    number += 1  # another writer took this number; take the next
                    continue
                break
            else:
                raise OSError(f"could not find a free file name in {folder}; check the folder")
        if self.history is not None:
            self.history.add(path, owner, infotext)
        return path


class OwnedOutputs:
    """An OutputStore whose saves belong to one owner; everything else is the store's."""

    def __init__(self, store: OutputStore, owner: str | None) -> None:
        self.store = store
        self.owner = owner

    def save(self, image: Image.Image, *, category: str, seed: int, infotext: str | None, fmt: str = "png") -> Path:
        return self.store.save(image, category=category, seed=seed, infotext=infotext, fmt=fmt, owner=self.owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)
