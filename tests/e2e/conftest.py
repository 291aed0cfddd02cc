"""The real server: `app.main` in a subprocess on a free loopback port, over a temporary data dir
whose models folder holds a tiny single-file checkpoint (and a truncated one, for the error path)
and a LoRA header; the REST API is on (--api) behind its own login (--api-auth), the UI is open."""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import factories, stripped

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180  # imports of torch + diffusers + gradio on a busy 2-core machine
API_AUTH = ("apiuser", "apipass")


@dataclass
class Server:
    url: str
    data_dir: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_server(process: subprocess.Popen) -> None:
    """Terminate a server started by a fixture; kill it if it does not stop in 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_until_serving(server: Server, path: str = "/", ready=(200,)) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                if response.status in ready:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ready:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("e2e-data")
    checkpoints = data_dir / "models" / "Stable-diffusion"
    tiny = factories.write_tiny_checkpoint(checkpoints / "tiny.safetensors", seed=0)
    # A valid header over missing tensor data: listed by the registry, fails when loaded.
    data = tiny.read_bytes()
    (checkpoints / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    stripped.write_stripped(data_dir / "models" / "Lora" / "styleA_v3.safetensors", stripped.kohya_lora_sd1_layout(),
                            stripped.KOHYA_SD1_METADATA)
    port = free_port()
    log = data_dir.parent / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("EASEL_DATA_DIR", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys, app; sys.exit(app.main(sys.argv[1:]))",
             "--data-dir", str(data_dir), "--port", str(port), "--device", "cpu",
             "--api", "--api-auth", ":".join(API_AUTH)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Server(url=f"http://127.0.0.1:{port}", data_dir=data_dir, log=log, process=process)
    try:
        wait_until_serving(running)
        wait_until_serving(running, "/openapi.json", ready=(401,))  # the REST API mounts just after launch
        yield running
    finally:
        stop_server(process)


@pytest.fixture(scope="session")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)
