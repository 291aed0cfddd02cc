"""Saving files so that a crash never leaves a half-written one, and naming outputs like A1111.

Atomic writes go to a hidden temporary file in the target's folder, are fsync'ed, then moved
over the target with `os.replace` (or hard-linked into place when overwriting is not allowed),
so readers see the old file or the new one, never a mix. The temporary file is removed on any
failure.

`OutputStore` writes `root/<category>/<YYYY-MM-DD>/<NNNNN>-<seed>.<ext>` where NNNNN is one more
than the highest number already in that folder (A1111's `get_next_sequence_number`), starting at
00000, and never overwrites a file, even one another process wrote meanwhile.
"""
from __future__ import annotations

import errno
import json
import os
import re
import threading
import uuid
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
MAX_NAME_ATTEMPTS = 1000

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


class OutputStore:
    """Writes generated images under `root`, one folder per category and day."""

    def __init__(self, root: str | os.PathLike, today: Callable[[], date] = date.today):
        self.root = Path(root)
        self._today = today
        self._lock = threading.Lock()

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
    ) -> Path:
        """Save `image` with its infotext as `<NNNNN>-<seed>.<ext>`; returns the new file's path."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        folder = self.folder(category)
        ext = _extension(fmt)
        data = image_bytes_with_infotext(image, infotext, fmt)
        with self._lock:
            number = next_sequence_number(folder)
            for _ in range(MAX_NAME_ATTEMPTS):
                path = folder / f"{number:05d}-{seed}.{ext}"
                try:
                    return atomic_write_bytes(path, data, overwrite=False)
                except FileExistsError:
                    number += 1  # another writer took this number; take the next
        raise OSError(f"could not find a free file name in {folder}; check the folder")
