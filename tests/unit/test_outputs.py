import json
import threading
from datetime import date

import pytest
from PIL import Image

from pipelines.metadata import read_infotext
from pipelines.outputs import (
    OUTPUT_CATEGORIES,
    OutputStore,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    next_sequence_number,
)

INFOTEXT = "a red fox, snow\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 16x16"


def _image(shade=0):
    image = Image.new("RGB", (16, 16))
    image.putdata([((x * 16 + shade) % 256, y * 16, (x ^ y) * 8) for y in range(16) for x in range(16)])
    return image


class FakeClock:
    def __init__(self, day):
        self.day = day

    def __call__(self):
        return self.day


# ------------------------------------------------------------------ atomic writes


def test_atomic_writes_create_parents_and_leave_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write_bytes(target, b"\x00\x01data") == target
    assert target.read_bytes() == b"\x00\x01data"
    atomic_write_text(tmp_path / "t.txt", "héllo 猫")
    assert (tmp_path / "t.txt").read_bytes() == "héllo 猫".encode("utf-8")
    atomic_write_json(tmp_path / "c.json", {"k": [1, 2], "名": "値"})
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"k": [1, 2], "名": "値"}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.json", "file.bin", "t.txt"]


def test_atomic_write_replaces_existing(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "cache.json"
    target.write_text("old contents")

    def failing_writer(handle):
        handle.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, failing_writer)
    assert target.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_unserialisable_json_keeps_old_file(tmp_path):
    target = tmp_path / "c.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": {1, 2}})
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_no_overwrite_mode(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    atomic_write_bytes(tmp_path / "y.bin", b"new", overwrite=False)
    assert (tmp_path / "y.bin").read_bytes() == b"new"


# ------------------------------------------------------------------ OutputStore


def test_first_file_is_numbered_00000_in_a_date_folder(tmp_path):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    path = store.save(_image(), category="txt2img-images", seed=42, infotext=INFOTEXT)
    assert path == tmp_path / "txt2img-images" / "2024-07-27" / "00000-42.png"
    assert path.is_file()


def test_saved_png_has_same_pixels_and_infotext(tmp_path):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    source = _image(7)
    path = store.save(source, category="img2img-images", seed=5, infotext=INFOTEXT)
    with Image.open(path) as saved:
        assert saved.size == source.size
        assert saved.convert("RGB").tobytes() == source.tobytes()
        assert read_infotext(saved) == INFOTEXT


def test_numbering_continues_after_existing_files(tmp_path):
    folder = tmp_path / "txt2img-images" / "2024-07-27"
    folder.mkdir(parents=True)
    for name in ("00000-1.png", "00007-99.png", "00003-5.jpg", "notes.txt", "123-short.png", ".00050-x.tmp"):
        (folder / name).write_bytes(b"x")
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    first = store.save(_image(), category="txt2img-images", seed=11, infotext=INFOTEXT)
    second = store.save(_image(), category="txt2img-images", seed=11, infotext=INFOTEXT)
    assert first.name == "00008-11.png"
    assert second.name == "00009-11.png"
    assert (folder / "00007-99.png").read_bytes() == b"x"  # nothing overwritten


def test_numbers_past_99999_keep_counting(tmp_path):
    folder = tmp_path / "extras-images" / "2024-07-27"
    folder.mkdir(parents=True)
    (folder / "99999-1.png").write_bytes(b"x")
    assert next_sequence_number(folder) == 100000
    (folder / "100000-1.png").write_bytes(b"x")
    assert next_sequence_number(folder) == 100001
    assert next_sequence_number(tmp_path / "missing") == 0


def test_date_folders_follow_the_clock(tmp_path):
    clock = FakeClock(date(2024, 12, 31))
    store = OutputStore(tmp_path, today=clock)
    a = store.save(_image(), category="txt2img-images", seed=1, infotext=INFOTEXT)
    clock.day = date(2025, 1, 1)
    b = store.save(_image(), category="txt2img-images", seed=2, infotext=INFOTEXT)
    assert a.relative_to(tmp_path).as_posix() == "txt2img-images/2024-12-31/00000-1.png"
    assert b.relative_to(tmp_path).as_posix() == "txt2img-images/2025-01-01/00000-2.png"


def test_same_name_from_another_writer_is_not_overwritten(tmp_path, monkeypatch):
    import pipelines.outputs as outputs

    folder = tmp_path / "txt2img-images" / "2024-07-27"
    real_scan = outputs.next_sequence_number

    def scan_then_race(path):
        # another process creates our chosen name between the scan and the write
        number = real_scan(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{number:05d}-3.png").write_bytes(b"theirs")
        return number

    monkeypatch.setattr(outputs, "next_sequence_number", scan_then_race)
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    path = store.save(_image(), category="txt2img-images", seed=3, infotext=INFOTEXT)
    assert path.name == "00001-3.png"
    assert (folder / "00000-3.png").read_bytes() == b"theirs"
    assert sorted(p.name for p in folder.iterdir()) == ["00000-3.png", "00001-3.png"]


def test_jpeg_and_webp_extensions_and_infotext(tmp_path):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    jpg = store.save(_image(), category="txt2img-images", seed=9, infotext=INFOTEXT, fmt="jpeg")
    webp = store.save(_image(), category="txt2img-images", seed=9, infotext=INFOTEXT, fmt="webp")
    assert (jpg.name, webp.name) == ("00000-9.jpg", "00001-9.webp")
    for path in (jpg, webp):
        with Image.open(path) as saved:
            assert read_infotext(saved) == INFOTEXT


def test_threads_never_collide(tmp_path):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    image = _image()
    paths = []
    lock = threading.Lock()

    def work(seed):
        for _ in range(5):
            path = store.save(image, category="txt2img-grids", seed=seed, infotext=None)
            with lock:
                paths.append(path)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = sorted(int(p.name.split("-")[0]) for p in paths)
    assert numbers == list(range(20))
    assert len(list((tmp_path / "txt2img-grids" / "2024-07-27").iterdir())) == 20


@pytest.mark.parametrize("category", ["../escape", "txt2img-images/../../x", "/abs", "outputs", ""])
def test_unknown_category_is_rejected(tmp_path, category):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    with pytest.raises(ValueError, match="unknown output category"):
        store.save(_image(), category=category, seed=1, infotext=INFOTEXT)
    assert list(tmp_path.iterdir()) == []


def test_every_known_category_saves_inside_root(tmp_path):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    for category in sorted(OUTPUT_CATEGORIES):
        path = store.save(_image(), category=category, seed=1, infotext=None)
        assert path.resolve().is_relative_to(tmp_path.resolve())
        assert path.parent.parent.name == category


def test_bad_seed_and_format_are_rejected(tmp_path):
    store = OutputStore(tmp_path, today=FakeClock(date(2024, 7, 27)))
    with pytest.raises(ValueError, match="seed"):
        store.save(_image(), category="txt2img-images", seed="42", infotext=None)
    with pytest.raises(ValueError, match="seed"):
        store.save(_image(), category="txt2img-images", seed=True, infotext=None)
    with pytest.raises(ValueError, match="png, jpeg or webp"):
        store.save(_image(), category="txt2img-images", seed=1, infotext=None, fmt="gif")
    assert list(tmp_path.iterdir()) == []


def test_default_clock_is_today(tmp_path):
    path = OutputStore(tmp_path).save(_image(), category="txt2img-images", seed=1, infotext=None)
    assert path.parent.name == date.today().isoformat()
