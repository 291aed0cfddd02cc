"""Startup: seconds from `python app.py` to the UI answering, and to the first image.

    python bench/startup.py [--out F] [--md]

Starts app.py with --api on a free loopback port and an empty temp data dir (the built-in
tiny-world model), polls GET / until it answers 200, then asks the REST API for one 64x64,
4-step txt2img image. Both times count from the process start.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, append_section, emit, environment, markdown_table  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(timeout_s: float) -> dict:
    import requests

    port = _free_port()
    data = tempfile.mkdtemp(prefix="easel-bench-startup-")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--api", "--port", str(port), "--data-dir", data],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}"
        ui_s = None
        while time.perf_counter() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}")
            try:
                if requests.get(url + "/", timeout=2).status_code == 200:
                    ui_s = time.perf_counter() - start
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        if ui_s is None:
            raise RuntimeError("the UI did not answer in time")
        payload = {"prompt": "a red square", "width": 64, "height": 64, "steps": 4, "seed": 1}
        while True:  # the REST API is mounted just after the UI starts answering
            reply = requests.post(url + "/sdapi/v1/txt2img", json=payload, timeout=timeout_s)
            if reply.status_code != 404 or time.perf_counter() - start > timeout_s:
                break
            time.sleep(0.1)
        reply.raise_for_status()
        assert reply.json()["images"], "no image came back"
        first_image_s = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"bench": "startup", "ui_answering_s": round(ui_s, 2), "first_image_s": round(first_image_s, 2),
            "env": environment()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.timeout)
    emit(r, args.out)
    if args.md:
        append_section("Startup", "python bench/startup.py " + " ".join(argv or sys.argv[1:]), r["env"],
                       markdown_table(["from `python app.py` to", "s"],
                                      [["UI answering (GET / 200)", r["ui_answering_s"]],
                                       ["first image (REST txt2img, tiny-world 64px, 4 steps)", r["first_image_s"]]]))


if __name__ == "__main__":
    main()
