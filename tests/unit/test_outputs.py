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


# ------------------------------------------------------------------ crash recovery and history index

KILLED_SAVE = """
import sys, time
from pipelines.outputs import atomic_write

def half_then_hang(handle):
    handle.write(open(sys.argv[2], "rb").read()[:200])  # the first part of a real PNG
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)

atomic_write(sys.argv[1], half_then_hang, overwrite=False)
"""


def _history_store(tmp_path, clock=None):
    from pipelines.history import HistoryIndex

    history = HistoryIndex(tmp_path / "history.json", tmp_path / "outputs")
    return OutputStore(tmp_path / "outputs", today=clock or FakeClock(date(2024, 7, 27)), history=history), history


def test_a_save_killed_midway_leaves_no_partial_png_and_the_next_start_sweeps_its_temp(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import app
    from pipelines.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    store, _history = _history_store(settings.data_dir)
    done = store.save(_image(1), category="txt2img-images", seed=1, infotext=INFOTEXT, owner="user:ann")
    folder = done.parent
    target = folder / "00001-2.png"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target), str(done)],
                               cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    (temp,) = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert temp.name.startswith(".00001-2.png.") and temp.stat().st_size == 200
    assert not target.exists()  # never a partial image under the real name

    outputs = app.open_outputs(settings)  # what app.build_context does on start
    assert sorted(p.name for p in folder.iterdir()) == [done.name]
    assert [e.path for e in outputs.history.entries()] == [done.relative_to(settings.outputs_dir).as_posix()]
    again = outputs.save(_image(2), category="txt2img-images", seed=2, infotext=INFOTEXT)
    assert again.name.endswith("-2.png") and Image.open(again).size == (16, 16)


def test_saved_images_are_indexed_with_owner_and_summary_and_a_deleted_index_is_rebuilt_the_same(tmp_path):
    from pipelines.history import HistoryIndex

    store, history = _history_store(tmp_path)
    ann = store.for_owner("user:ann")
    first = ann.save(_image(1), category="txt2img-images", seed=11, infotext=INFOTEXT)
    second = store.for_owner("user:bob").save(_image(2), category="img2img-images", seed=12, infotext="a cat\nSteps: 5, Seed: 12, Size: 16x16")
    third = ann.save(_image(3), category="txt2img-images", seed=13, infotext=None)
    with Image.open(first) as saved:
        assert saved.info["easel_owner"] == "user:ann" and read_infotext(saved) == INFOTEXT
        assert saved.convert("RGB").tobytes() == _image(1).tobytes()
    assert [e.path for e in history.entries(owner="user:ann")] == [
        third.relative_to(tmp_path / "outputs").as_posix(), first.relative_to(tmp_path / "outputs").as_posix()]
    (entry,) = history.entries(owner="user:bob")
    assert (entry.category, entry.prompt, dict(entry.params)) == ("img2img-images", "a cat",
                                                                  {"Steps": "5", "Seed": "12", "Size": "16x16"})
    first_entry = history.entries(owner="user:ann")[-1]
    assert first_entry.negative_prompt == "blurry" and dict(first_entry.params)["Sampler"] == "Euler a"
    before = history.entries()
    assert len(before) == 3 and second.exists()

    (tmp_path / "history.json").unlink()
    rebuilt = HistoryIndex(tmp_path / "history.json", tmp_path / "outputs")
    assert rebuilt.load_or_rebuild() == "rebuilt (missing)"
    assert rebuilt.entries() == before  # owners come back from the PNGs' easel_owner chunk
    assert HistoryIndex(tmp_path / "history.json", tmp_path / "outputs").load_or_rebuild() == "loaded"


def test_a_corrupt_or_stale_index_is_rebuilt_from_the_files(tmp_path):
    from pipelines.history import HistoryIndex

    store, history = _history_store(tmp_path)
    kept = store.save(_image(1), category="txt2img-images", seed=1, infotext=INFOTEXT, owner="user:ann")
    gone = store.save(_image(2), category="txt2img-images", seed=2, infotext=INFOTEXT, owner="user:ann")
    session = store.save(_image(3), category="txt2img-images", seed=3, infotext=INFOTEXT, owner="session:abc")
    with Image.open(session) as saved:
        assert "easel_owner" not in saved.info  # a session id is not written into a shared file
    expected = history.entries()
    for corrupt in ('{"version": 1, "entries": [{"path": 3}]}', "{not json", '{"version": 99, "entries": []}', "[]"):
        (tmp_path / "history.json").write_text(corrupt)
        fresh = HistoryIndex(tmp_path / "history.json", tmp_path / "outputs")
        assert fresh.load_or_rebuild() == "rebuilt (corrupt)"
        # the same entries, except that the session's owner lived in the index only
        assert [(e.path, e.owner) for e in fresh.entries()] == [
            (e.path, "" if e.owner.startswith("session:") else e.owner) for e in expected]
    assert HistoryIndex(tmp_path / "history.json", tmp_path / "outputs").load_or_rebuild() == "loaded"

    gone.unlink()  # deleted by hand, and an image that did not go through the store (Extras, a copy)
    extra = tmp_path / "outputs" / "extras-images" / "2024-07-27" / "00000-5.png"
    extra.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(extra)
    (tmp_path / "outputs" / "notes.txt").write_text("not an image")
    stale = HistoryIndex(tmp_path / "history.json", tmp_path / "outputs")
    assert stale.load_or_rebuild() == "updated (stale: +1 ~0 -1)"
    paths = {e.path: e for e in stale.entries()}
    assert set(paths) == {kept.relative_to(tmp_path / "outputs").as_posix(),
                          session.relative_to(tmp_path / "outputs").as_posix(), "extras-images/2024-07-27/00000-5.png"}
    assert paths["extras-images/2024-07-27/00000-5.png"].category == "extras-images"
    assert HistoryIndex(tmp_path / "history.json", tmp_path / "outputs").load_or_rebuild() == "loaded"


def test_sweep_removes_only_atomic_write_temps(tmp_path):
    from pipelines.outputs import sweep_stale_temps

    folder = tmp_path / "txt2img-images" / "2024-07-27"
    folder.mkdir(parents=True)
    names = [".00001-5.png.0123456789ab.tmp", ".x.tmp", "00002-5.png", ".00003-1.png.nothex000000.tmp", "a.tmp"]
    for name in names:
        (folder / name).write_bytes(b"x")
    assert [p.name for p in sweep_stale_temps(tmp_path)] == [".00001-5.png.0123456789ab.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names[1:])
