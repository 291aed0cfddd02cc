import hashlib
import json
import os

import pytest

from pipelines import hashing
from pipelines.hashing import HashCache, addnet_hash, autov1, sha256_file, sha256_folder
from tests import stripped


@pytest.fixture()
def blob(tmp_path):
    # Over 1 MiB + 64 KiB so AutoV1's window is inside the file, and not a multiple of the chunk.
    data = os.urandom((1 << 20) + 0x10000 + 12345)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    return path, data


def lora_file(tmp_path, name="lora.safetensors", metadata=None, seed=b"x"):
    data = hashlib.sha256(seed).digest() * 64  # 2048 bytes = 4 x 8 x 32 F16
    path = stripped.write_stripped(tmp_path / name, {"a": (4, 8, 32)}, metadata, data=data)
    return path, data


def test_sha256_and_autov1_match_hashlib(blob):
    path, data = blob
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert autov1(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_addnet_hash_covers_only_the_data_section(tmp_path):
    path, data = lora_file(tmp_path)
    assert addnet_hash(path) == hashlib.sha256(data).hexdigest()
    # Changing the metadata (the header) does not change AutoV3; changing the data does.
    other, _ = lora_file(tmp_path, "renamed.safetensors", {"ss_output_name": "other"})
    assert addnet_hash(other) == addnet_hash(path)
    changed, _ = lora_file(tmp_path, "changed.safetensors", seed=b"y")
    assert addnet_hash(changed) != addnet_hash(path)


def test_addnet_hash_refuses_non_safetensors(blob):
    with pytest.raises(ValueError, match="not a safetensors file"):
        addnet_hash(blob[0])


def test_folder_hash_changes_with_any_file(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "model_index.json").write_text("{}")
    (tmp_path / "m" / "unet" / "w.bin").write_bytes(b"1234")
    first = sha256_folder(tmp_path / "m")
    expected = hashlib.sha256(
        f"model_index.json\0{hashlib.sha256(b'{}').hexdigest()}\n"
        f"unet/w.bin\0{hashlib.sha256(b'1234').hexdigest()}\n".encode()).hexdigest()
    assert first == expected
    (tmp_path / "m" / "unet" / "w.bin").write_bytes(b"1235")
    assert sha256_folder(tmp_path / "m") != first


def test_cache_writes_a1111_shape_and_reuses_entries(tmp_path, blob, monkeypatch):
    path, data = blob
    cache_file = tmp_path / "data" / "cache.json"
    cache = HashCache(cache_file)
    assert cache.cached_sha256(path, "checkpoint/model.ckpt") is None
    assert cache.sha256(path, "checkpoint/model.ckpt") == hashlib.sha256(data).hexdigest()

    saved = json.loads(cache_file.read_text())
    st = path.stat()
    assert saved["hashes"] == {"checkpoint/model.ckpt": {"mtime": st.st_mtime, "size": st.st_size,
                                                          "sha256": hashlib.sha256(data).hexdigest()}}
    assert saved["hashes-addnet"] == {}
    assert [p.name for p in cache_file.parent.iterdir()] == ["cache.json"]  # no temp file left

    # A fresh cache object (a restart) reads the file and does not hash again.
    monkeypatch.setattr(hashing, "sha256_file", lambda p: pytest.fail("hashed a cached file"))
    again = HashCache(cache_file)
    assert again.sha256(path, "checkpoint/model.ckpt") == hashlib.sha256(data).hexdigest()
    assert again.cached_sha256(path, "checkpoint/model.ckpt") == hashlib.sha256(data).hexdigest()


def test_touching_or_resizing_a_file_makes_it_stale(tmp_path, blob):
    path, data = blob
    cache = HashCache(tmp_path / "cache.json")
    cache.sha256(path, "t")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cache.cached_sha256(path, "t") is None  # mtime differs

    new_data = data + b"more"
    path.write_bytes(new_data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime as recorded, new size
    assert cache.cached_sha256(path, "t") is None
    assert cache.sha256(path, "t") == hashlib.sha256(new_data).hexdigest()
    saved = json.loads((tmp_path / "cache.json").read_text())["hashes"]["t"]
    assert saved["size"] == len(new_data)


def test_a1111_entries_without_size_are_used_and_other_sections_kept(tmp_path, blob):
    path, data = blob
    cache_file = tmp_path / "cache.json"
    a1111 = {"hashes": {"checkpoint/model.ckpt": {"mtime": path.stat().st_mtime, "sha256": "ab" * 32}},
             "safetensors-metadata": {"lora/x": {"mtime": 1.0, "value": {"ss_output_name": "x"}}}}
    cache_file.write_text(json.dumps(a1111))
    cache = HashCache(cache_file)
    assert cache.sha256(path, "checkpoint/model.ckpt") == "ab" * 32  # trusted as A1111 does
    cache.sha256(path, "checkpoint/other.ckpt")
    saved = json.loads(cache_file.read_text())
    assert saved["safetensors-metadata"] == a1111["safetensors-metadata"]
    assert saved["hashes"]["checkpoint/model.ckpt"] == a1111["hashes"]["checkpoint/model.ckpt"]
    assert saved["hashes"]["checkpoint/other.ckpt"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_damaged_cache_file_is_replaced(tmp_path, blob):
    cache_file = tmp_path / "cache.json"
    cache_file.write_text("{half")
    cache = HashCache(cache_file)
    assert cache.sha256(blob[0], "t") == hashlib.sha256(blob[1]).hexdigest()
    assert "t" in json.loads(cache_file.read_text())["hashes"]


def test_addnet_uses_kohya_hash_and_its_own_section(tmp_path, monkeypatch):
    path, data = lora_file(tmp_path)
    cache = HashCache(tmp_path / "cache.json")
    assert cache.addnet(path, "lora/lora.safetensors") == hashlib.sha256(data).hexdigest()
    saved = json.loads((tmp_path / "cache.json").read_text())
    assert saved["hashes-addnet"]["lora/lora.safetensors"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert saved["hashes"] == {}

    kohya, _ = lora_file(tmp_path, "kohya.safetensors", {"sshs_model_hash": "cd" * 32})
    monkeypatch.setattr(hashing, "addnet_hash", lambda p: pytest.fail("hashed despite sshs_model_hash"))
    assert cache.addnet(kohya, "lora/kohya.safetensors") == "cd" * 32


def test_addnet_of_a_pickle_is_its_sha256(tmp_path, blob):
    cache = HashCache(tmp_path / "cache.json")
    assert cache.addnet(blob[0], "lora/model.ckpt") == hashlib.sha256(blob[1]).hexdigest()
    assert cache.cached_addnet(blob[0], "lora/model.ckpt") == hashlib.sha256(blob[1]).hexdigest()


def test_hashing_streams_in_1mib_chunks(blob, monkeypatch):
    path, data = blob
    sizes = []
    real_open = open

    class Recorder:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            sizes.append(n)
            return self._f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Recorder(real_open(*a, **k)))
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert set(sizes) == {1 << 20}


def test_cache_write_is_atomic(tmp_path, blob, monkeypatch):
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(json.dumps({"hashes": {}, "keep": 1}))
    cache = HashCache(cache_file)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    assert cache.sha256(blob[0], "t") == hashlib.sha256(blob[1]).hexdigest()  # the cache is only a cache
    assert json.loads(cache_file.read_text()) == {"hashes": {}, "keep": 1}  # old file intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
