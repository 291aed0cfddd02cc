"""A byte-budgeted LRU cache with locks for what is in use (InvokeAI's simple model cache
policy, without its machinery). Sizes come from the tensors, not the files."""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

import torch


def module_bytes(obj: Any) -> int:
    """Bytes held by the parameters and buffers of a module, or of a dict of modules."""
    if isinstance(obj, dict):
        return sum(module_bytes(v) for v in obj.values())
    if isinstance(obj, torch.nn.Module):
        tensors = list(obj.parameters()) + list(obj.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)
    return 0


@dataclass
class CacheRecord:
    key: Hashable
    value: Any
    size: int
    locks: int = 0

    @property
    def locked(self) -> bool:
        return self.locks > 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: list = field(default_factory=list)


class ModelCache:
    def __init__(self, max_bytes: int, on_evict: Callable[[Hashable, Any], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._records: OrderedDict[Hashable, CacheRecord] = OrderedDict()  # oldest first
        self._lock = threading.RLock()
        self._on_evict = on_evict
        self.stats = CacheStats()

    @property
    def current_bytes(self) -> int:
        with self._lock:
            return sum(r.size for r in self._records.values())

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._records)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._records

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            record = self._records.get(key)
            if record is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self._records.move_to_end(key)
            return record.value

    def get_or_load(self, key: Hashable, load: Callable[[], Any], size_of: Callable[[Any], int] = module_bytes) -> Any:
        value = self.get(key)
        if value is None:
            value = load()  # may raise: the cache is then unchanged
            self.put(key, value, size_of(value))
        return value

    def put(self, key: Hashable, value: Any, size: int) -> None:
        with self._lock:
            if key in self._records:
                self._records.pop(key)
            self.make_room(size)
            self._records[key] = CacheRecord(key, value, size)

    def make_room(self, size: int) -> None:
        """Evict unlocked entries, least recently used first, until `size` more bytes fit.
        Locked entries stay even when that leaves the cache over budget."""
        with self._lock:
            evicted = False
            for key in list(self._records):
                if self.current_bytes + size <= self.max_bytes:
                    break
                record = self._records[key]
                if record.locked:
                    continue
                del self._records[key]
                self.stats.evictions.append(key)
                evicted = True
                if self._on_evict:
                    self._on_evict(key, record.value)
        if evicted:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @contextmanager
    def locked(self, key: Hashable) -> Iterator[Any]:
        with self._lock:
            record = self._records.get(key)
            if record is None:
                raise KeyError(f"{key!r} is not in the cache")
            record.locks += 1
        try:
            yield record.value
        finally:
            with self._lock:
                record.locks -= 1

    def lock(self, key: Hashable) -> None:
        with self._lock:
            self._records[key].locks += 1

    def unlock(self, key: Hashable) -> None:
        with self._lock:
            record = self._records.get(key)
            if record is not None and record.locks > 0:
                record.locks -= 1

    def is_locked(self, key: Hashable) -> bool:
        with self._lock:
            record = self._records.get(key)
            return bool(record and record.locked)

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._records.pop(key, None)
