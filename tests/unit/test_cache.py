import torch

from pipelines.cache import ModelCache, module_bytes


def _module(n_floats: int) -> torch.nn.Module:
    m = torch.nn.Module()
    m.register_buffer("w", torch.zeros(n_floats))
    return m


def test_module_bytes_counts_parameters_and_buffers():
    m = torch.nn.Linear(10, 10)  # 110 float32 parameters
    assert module_bytes(m) == 110 * 4
    assert module_bytes({"a": m, "b": _module(25), "c": "not a module"}) == 110 * 4 + 100


def test_eviction_is_lru_by_bytes():
    cache = ModelCache(max_bytes=300)
    for key in "abc":
        cache.put(key, _module(25), 100)
    cache.get("a")  # a becomes most recent; b is now the oldest
    cache.put("d", _module(25), 100)
    assert cache.keys() == ["c", "a", "d"]
    assert cache.stats.evictions == ["b"]
    assert cache.current_bytes == 300


def test_locked_entries_survive_even_over_budget():
    cache = ModelCache(max_bytes=200)
    cache.put("a", 1, 100)
    cache.put("b", 2, 100)
    with cache.locked("a"):
        cache.put("c", 3, 150)
        assert "a" in cache and "b" not in cache and "c" in cache
        cache.put("d", 4, 150)
        assert "a" in cache  # still locked, though the cache is now over its budget
    assert not cache.is_locked("a")
    cache.put("e", 5, 150)
    assert "a" not in cache


def test_get_or_load_counts_loads_and_leaves_cache_unchanged_on_failure():
    cache = ModelCache(max_bytes=10_000)
    loads = []

    def load():
        loads.append(1)
        return _module(10)

    first = cache.get_or_load("x", load)
    second = cache.get_or_load("x", load)
    assert first is second and len(loads) == 1

    def broken():
        raise ValueError("corrupt")

    try:
        cache.get_or_load("y", broken)
    except ValueError:
        pass
    assert cache.keys() == ["x"]


def test_on_evict_callback_receives_value():
    seen = []
    cache = ModelCache(max_bytes=100, on_evict=lambda k, v: seen.append((k, v)))
    cache.put("a", "A", 100)
    cache.put("b", "B", 100)
    assert seen == [("a", "A")]
