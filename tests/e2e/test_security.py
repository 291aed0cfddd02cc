"""A shared, logged-in server under load and attack, on loopback.

The server runs with `--share --auth-file` while every proxy points at a closed port, so the
share tunnel fails as it does offline and the app must keep serving locally. Nine users (one
admin), three tiny checkpoints, and a models folder holding broken and malicious files.

Policy tested here (README "Sharing safely"): the outputs folder is shared between logged-in
users, as in A1111; nothing else on disk is served, and nobody is served without logging in.
With logins, what every user shares (the REST API's default model, loading/unloading it,
cancelling everyone's jobs) is for the admin only.
"""
import http.client
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from pipelines.access import hash_password
from pipelines.metadata import read_infotext
from tests import factories
from tests.e2e.conftest import REPO_ROOT, Server, free_port, stop_server, wait_until_serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = 8
REQUESTS_PER_CLIENT = 5
CHECKPOINTS = ("tinyA", "tinyB", "tinyC")
LORAS = ("loraA", "loraB", "loraC")
MAX_REQUEST_MB = 40  # a 25 MB upload as base64 (33.4 MB) fits; 41 MB bodies do not
PASSWORDS = {f"u{i}": f"pw-{i}" for i in range(CLIENTS)} | {"root": "root-pw"}
BASE = dict(prompt="p", negative_prompt="", sampler="Euler", schedule="Automatic", steps=1, cfg_scale=5,
            width=64, height=64, seed=1, batch_count=1, batch_size=1, checkpoint="tinyA", vae="Automatic")


class Payload:
    """Unpickling this writes the marker file: the server must never do it."""

    def __reduce__(self):
        return (exec, ("import pathlib, os; pathlib.Path(os.environ['EASEL_PWNED']).write_text('x')",))


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    body = zlib.compress((b"\x00" + b"\x00" * (width // 8)) * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def write_mismatched_vae(path: Path) -> None:
    """A VAE whose channel widths fit no tiny checkpoint (the SDXL-VAE-on-SD1 case, in small)."""
    from diffusers import AutoencoderKL

    from pipelines.ldm_convert import save_ldm_checkpoint, vae_to_ldm

    config = dict(AutoencoderKL.load_config(factories.config_dir(factories.Arch.TINYWORLD) / "vae"))
    config["block_out_channels"] = [32, 32, 64]
    vae = AutoencoderKL.from_config(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ldm_checkpoint(path, vae_to_ldm(vae.state_dict()))


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    data_dir = root / "data"
    checkpoints = data_dir / "models" / "Stable-diffusion"
    for seed, name in enumerate(CHECKPOINTS):
        factories.write_tiny_checkpoint(checkpoints / f"{name}.safetensors", seed=seed)
    good = (checkpoints / "tinyA.safetensors").read_bytes()
    (checkpoints / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (checkpoints / "garbage.safetensors").write_bytes(os.urandom(4096))
    with open(checkpoints / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {}, "x": Payload()}, handle, protocol=2)
    write_mismatched_vae(data_dir / "models" / "VAE" / "xl-shaped.safetensors")
    # SD1's shapes (a real SDXL VAE has them too): only its name says SDXL
    factories.write_tiny_vae(data_dir / "models" / "VAE" / "sdxl_vae.safetensors")
    for seed, name in enumerate(LORAS):
        factories.write_tiny_lora(data_dir / "models" / "Lora" / f"{name}.safetensors", seed=seed)
    users = root / "users.txt"
    users.write_text("# one admin, eight users; u0's password is stored hashed\n@root:root-pw\n"
                     f"u0:{hash_password('pw-0', iterations=1000)}\n"
                     + "".join(f"u{i}:pw-{i}\n" for i in range(1, CLIENTS)))
    marker = root / "pwned"
    port = free_port()
    log = root / "server.log"
    dead = "http://127.0.0.1:9"  # closed port: the tunnel fails like it does offline
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "EASEL_PWNED": str(marker),
           "HTTPS_PROXY": dead, "HTTP_PROXY": dead, "https_proxy": dead, "http_proxy": dead,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("EASEL_DATA_DIR", None)
    env.pop("GRADIO_TEMP_DIR", None)  # the app must choose data_dir/tmp/gradio itself
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys, app; sys.exit(app.main(sys.argv[1:]))",
             "--data-dir", str(data_dir), "--port", str(port), "--device", "cpu", "--share",
             "--auth-file", str(users), "--max-queued-per-user", str(REQUESTS_PER_CLIENT),
             "--max-width", "1024", "--max-steps", "100", "--max-request-mb", str(MAX_REQUEST_MB), "--api"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}", data_dir=data_dir, log=log, process=process)
    server.marker = marker
    server.users_file = users
    try:
        wait_until_serving(server)
        yield server
    finally:
        stop_server(process)


def connect(server, user: str):
    import httpx
    from gradio_client import Client

    # No read timeout: on a busy CI machine the 8 first connections can take longer than
    # gradio_client's default; a dead server still fails the test through its own timeouts.
    return Client(server.url, auth=(user, PASSWORDS[user]), verbose=False,
                  httpx_kwargs={"timeout": httpx.Timeout(120.0, read=None)})


@pytest.fixture(scope="module")
def clients(shared_server):
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda i: connect(shared_server, f"u{i}"), range(CLIENTS)))


def txt2img(client, **changes):
    return client.predict(**{**BASE, **changes}, api_name="/txt2img")


def logged_in_session(server, user: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    response = session.post(server.url + "/login", data={"username": user, "password": PASSWORDS[user]}, timeout=30)
    assert response.status_code == 200, response.text
    return session


def raw_get(server, path: str, cookies: dict | None = None) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (no client-side `..` normalisation)."""
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())} if cookies else {}
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def raw_call(server, session, **changes) -> tuple[int, str]:
    """POST /gradio_api/call/txt2img with a hand-made JSON body; (status, the event stream)."""
    info = session.get(f"{server.url}/gradio_api/info", timeout=30).json()
    parameters = info["named_endpoints"]["/txt2img"]["parameters"]
    values = {**BASE, **changes}
    data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in parameters]
    payload = json.dumps({"data": data})  # allow_nan: NaN goes out as a literal
    call = session.post(f"{server.url}/gradio_api/call/txt2img", data=payload,
                        headers={"Content-Type": "application/json"}, timeout=120)
    if not call.ok:
        return call.status_code, call.text
    event_id = call.json()["event_id"]
    return call.status_code, session.get(f"{server.url}/gradio_api/call/txt2img/{event_id}", timeout=120).text


# --- launch --------------------------------------------------------------------------------

def test_share_without_auth_exits_non_zero_and_says_how_to_add_a_login(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys, app; sys.exit(app.main(sys.argv[1:]))",
                           "--data-dir", str(tmp_path), "--share"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert "--share" in done.stderr and "--auth user:password" in done.stderr and "--auth-file" in done.stderr


def test_with_auth_the_app_serves_locally_although_the_tunnel_failed(shared_server):
    deadline = time.monotonic() + 60  # the report is printed just after the server answers
    while "extension installation is disabled" not in (log := shared_server.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, log
        time.sleep(0.2)
    assert "users who may log in: root (admin), u0, u1" in log
    assert "share tunnel could not be opened" in log and "keeps running locally" in log
    assert "extension installation is disabled" in log
    # Nothing is served without logging in, not even the API description.
    plain = requests.Session()
    plain.trust_env = False
    assert plain.get(shared_server.url + "/gradio_api/info", timeout=30).status_code == 401
    assert logged_in_session(shared_server, "u3").get(shared_server.url + "/gradio_api/info", timeout=30).ok
    bad = requests.post(shared_server.url + "/login", data={"username": "u0", "password": "wrong"}, timeout=30)
    assert bad.status_code == 400


# --- load: every result arrives, belongs to its request, and users are served in turn ------

def rest_txt2img(server, user: str, request: dict) -> dict:
    """The A1111 REST route, HTTP Basic as the same user; returns the parsed `info`."""
    body = {"prompt": request["prompt"], "negative_prompt": "", "seed": request["seed"], "steps": request["steps"],
            "width": 64, "height": 64, "cfg_scale": 5, "sampler_name": "Euler", "save_images": True,
            "override_settings": {"sd_model_checkpoint": request["checkpoint"]}}
    session = requests.Session()
    session.trust_env = False
    response = session.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=(user, PASSWORDS[user]), timeout=300)
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])


def lora_hash(server, name: str) -> str:
    from pipelines.hashing import addnet_hash

    return addnet_hash(server.data_dir / "models" / "Lora" / f"{name}.safetensors")[:12]


def wait_for_jobs(client, count: int, timeout: float = 180) -> None:
    """Until the admin's queue view lists `count` jobs (running + waiting)."""
    deadline = time.monotonic() + timeout
    while len(client.predict(api_name="/queue")["jobs"]) < count:
        assert time.monotonic() < deadline, client.predict(api_name="/queue")
        time.sleep(0.2)


def test_eight_clients_five_requests_each_get_their_own_results_in_fair_turns(shared_server, clients):
    """Even clients use gradio_client, odd ones the REST API, all at once; every request has
    its own checkpoint, LoRA and weight, and its infotext must say so."""
    from PIL import Image

    root = connect(shared_server, "root")
    # The admin's long job holds the device until all 40 requests are queued, so the order
    # they run in is the queue's choice alone (not the order they happened to arrive in).
    blocker = root.submit(**{**BASE, "prompt": "hold the device", "steps": 100, "batch_count": 16,
                             "width": 256, "height": 256}, api_name="/txt2img")
    wait_for_jobs(root, 1)
    rest = ThreadPoolExecutor(CLIENTS // 2 * REQUESTS_PER_CLIENT)
    jobs = []
    # Each client queues all of its requests at once, one client after the other: first-come
    # would run the last client's first request 36th; round robin runs it in the first round.
    for i, client in enumerate(clients):
        for j in range(REQUESTS_PER_CLIENT):
            lora, weight = LORAS[(i + 2 * j) % len(LORAS)], (0.5, 1, 0.8)[(i + j) % 3]
            request = dict(prompt=f"client {i} request {j} <lora:{lora}:{weight}>", seed=1000 * i + j,
                           steps=1 + (i + j) % 2, checkpoint=CHECKPOINTS[(i + j) % len(CHECKPOINTS)], lora=lora)
            if i % 2:
                jobs.append((i, j, request, rest.submit(rest_txt2img, shared_server, f"u{i}", request)))
            else:
                fields = {k: v for k, v in request.items() if k != "lora"}
                jobs.append((i, j, request, client.submit(**{**BASE, **fields}, api_name="/txt2img")))
    wait_for_jobs(root, 1 + CLIENTS * REQUESTS_PER_CLIENT)
    assert root.predict(scope="mine", api_name="/cancel") == {"cancelled": 1}
    assert blocker.result(timeout=300)[1]["interrupted"] is True
    finished = []
    outputs = shared_server.data_dir / "outputs" / "txt2img-images"
    for i, j, request, job in jobs:
        if i % 2:
            info = job.result(timeout=300)
            (saved,) = outputs.glob(f"*/*-{request['seed']}.png")  # seeds are unique per request
        else:
            _gallery, info = job.result(timeout=300)
            saved = Path(info["paths"][0])
        (text,) = info["infotexts"]
        assert text.startswith(request["prompt"] + "\n")
        assert f"Seed: {request['seed']}," in text and f"Model: {request['checkpoint']}," in text
        assert f"Steps: {request['steps']}," in text
        assert f'Lora hashes: "{request["lora"]}: {lora_hash(shared_server, request["lora"])}"' in text
        with Image.open(saved) as image:
            assert read_infotext(image) == text
        finished.append((int(saved.name.split("-")[0]), i, j))
    rest.shutdown()
    assert len(finished) == CLIENTS * REQUESTS_PER_CLIENT
    assert len({number for number, _i, _j in finished}) == len(finished)  # nothing overwritten
    order = [i for _number, i, _j in sorted(finished)]
    # Exact round robin: every round runs each client once, in the same turn order.
    rounds = [order[k * CLIENTS:(k + 1) * CLIENTS] for k in range(REQUESTS_PER_CLIENT)]
    assert sorted(rounds[0]) == list(range(CLIENTS)), order
    assert all(r == rounds[0] for r in rounds), order

    # Each user's History lists exactly their own five images (UI user u0, REST user u1).
    view = clients[0].predict(api_name="/history")
    assert view["you"] == "user:u0"
    assert sorted(e["prompt"] for e in view["entries"]) == sorted(
        r["prompt"] for i, _j, r, _job in jobs if i == 0)
    assert all(e["owner"] == "user:u0" and Path(e["file"]).is_file() for e in view["entries"])
    session = requests.Session()
    session.trust_env = False
    rest_view = session.get(f"{shared_server.url}/sdapi/v1/history", auth=("u1", PASSWORDS["u1"]), timeout=30).json()
    assert sorted(e["prompt"] for e in rest_view["entries"]) == sorted(r["prompt"] for i, _j, r, _job in jobs if i == 1)


# --- isolation -----------------------------------------------------------------------------

def test_another_users_interrupt_does_not_stop_my_job_but_mine_and_an_admins_do(shared_server, clients):
    alice, bob = clients[0], clients[1]
    long = dict(prompt="long job", steps=60, seed=7)
    job = alice.submit(**{**BASE, **long}, api_name="/txt2img")
    deadline = time.monotonic() + 60
    while not any(j["state"] == "running" for j in alice.predict(api_name="/queue")["jobs"]):
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.2)
    assert bob.predict(scope="mine", api_name="/cancel") == {"cancelled": 0}
    interrupt = requests.post(f"{shared_server.url}/sdapi/v1/interrupt", auth=("u1", PASSWORDS["u1"]), timeout=30)
    assert interrupt.status_code == 200  # the REST interrupt is bob's too: alice's job runs on
    view = bob.predict(api_name="/queue")
    assert view["jobs"] == [] and view["admin"] is False
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="only admins"):
        bob.predict(scope="all", api_name="/cancel")
    _gallery, info = job.result(timeout=300)
    assert info["interrupted"] is False and "Steps: 60," in info["infotexts"][0]

    # The owner's own interrupt stops it, and so does an admin's.
    root = connect(shared_server, "root")
    for canceller, scope in ((alice, "mine"), (root, "all")):
        job = alice.submit(**{**BASE, **long, "seed": 8}, api_name="/txt2img")
        while not any(j["state"] == "running" for j in alice.predict(api_name="/queue")["jobs"]):
            assert time.monotonic() < deadline + 120
            time.sleep(0.2)
        if canceller is root:
            everyone = root.predict(api_name="/queue")
            assert everyone["admin"] is True and everyone["jobs"][0]["owner"] == "user:u0"
        assert canceller.predict(scope=scope, api_name="/cancel") == {"cancelled": 1}
        _gallery, info = job.result(timeout=300)
        assert info["interrupted"] is True


def test_files_outside_the_outputs_folder_are_never_served(shared_server, clients):
    _gallery, info = txt2img(clients[2], prompt="a private picture", seed=4242)
    saved = Path(info["paths"][0])
    owner = logged_in_session(shared_server, "u2")
    other = logged_in_session(shared_server, "u5")
    # Shared outputs policy: any logged-in user may open a saved image; nobody else may.
    for session in (owner, other):
        response = session.get(f"{shared_server.url}/gradio_api/file={saved}", timeout=30)
        assert response.status_code == 200 and response.content == saved.read_bytes()
    assert raw_get(shared_server, f"/gradio_api/file={saved}")[0] in (401, 403)
    cookies = other.cookies.get_dict()
    secrets = [shared_server.users_file, shared_server.data_dir / "models" / "Stable-diffusion" / "tinyA.safetensors",
               REPO_ROOT / "app.py", Path("/etc/passwd")]
    outputs = shared_server.data_dir / "outputs"
    paths = [f"/gradio_api/file={p}" for p in secrets] + [f"/file={p}" for p in secrets] + [
        f"/gradio_api/file={outputs}/../../{shared_server.users_file.name}",
        f"/gradio_api/file={outputs}/../models/Stable-diffusion/tinyA.safetensors",
        "/gradio_api/file=../../../../etc/passwd", "/file=../../../../etc/passwd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/gradio_api/file=..%2f..%2f..%2fetc%2fpasswd",
        f"/gradio_api/file={outputs}/%2e%2e/models/Stable-diffusion/tinyA.safetensors",
    ]
    for path in paths:
        status, body = raw_get(shared_server, path, cookies)
        assert status in (400, 403, 404, 405), (path, status)
        assert b"root-pw" not in body and b"root:" not in body and b"def main" not in body, path


# --- bad inputs: a clear error each, and the server keeps serving ---------------------------

RANGE = r"%s|value -?\d+ is (less|greater) than (minimum|maximum) value"


def expect_error(call, pattern: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as raised:
        call()
    message = str(raised.value)
    assert re.search(pattern, message, re.IGNORECASE), message
    assert "\n" not in message and len(message) < 400 and "Traceback" not in message
    return message


def test_bad_inputs_each_get_a_clear_error_and_the_server_keeps_serving(shared_server, clients, tmp_path):
    from gradio_client import handle_file

    client = clients[3]
    reference = txt2img(client, prompt="still here", seed=77)[1]["paths"][0]
    cases = {
        "truncated safetensors": (dict(checkpoint="truncated.safetensors"), r"truncated\.safetensors"),
        "garbage safetensors": (dict(checkpoint="garbage.safetensors"), r"garbage\.safetensors"),
        "malicious pickle": (dict(checkpoint="evil.ckpt"), r"evil\.ckpt.*(refused|unpickl)"),
        "VAE of another shape": (dict(vae="xl-shaped.safetensors"), r"VAE xl-shaped\.safetensors does not fit"),
        "SDXL VAE on SD1-like": (dict(vae="sdxl_vae.safetensors"),
                                 r"VAE sdxl_vae\.safetensors is an SDXL VAE .* does not fit the tinyworld checkpoint "
                                 r"tinyA\.safetensors"),
        # Gradio's sliders refuse out-of-range numbers first ("Value 0 is less than minimum value 64").
        "width 0": (dict(width=0), RANGE % "width"), "width 7": (dict(width=7), RANGE % "width"),
        "width 100000": (dict(width=100000), RANGE % "width"),
        "above the server limit": (dict(width=2048), r"width 2048 is above this server's limit of 1024"),
        "steps -1": (dict(steps=-1), RANGE % "steps"), "steps 10^6": (dict(steps=10**6), RANGE % "steps"),
        "huge prompt": (dict(prompt="x" * 30_000), r"prompt is 30000 characters"),
    }
    for name, (changes, pattern) in cases.items():
        expect_error(lambda: txt2img(client, **changes), pattern)
    traversal = "../../etc/passwd"
    for field, pattern in (("checkpoint", "not found"), ("vae", "not found"), ("sampler", "sampler"),
                           ("schedule", "schedule")):
        expect_error(lambda: txt2img(client, **{field: traversal}), pattern)
    img2img = dict(BASE, mode="img2img", denoising_strength=0.5, api_name="/img2img")
    image_file = Path(reference)
    # Radios: Gradio refuses values outside their choices before our handler runs.
    choice = r"%s|is not in the list of choices"
    for field, pattern in (("mode", choice % "mode"), ("resize_mode", choice % "resize mode"),
                           ("inpainting_fill", choice % "masked content"), ("inpaint_area", choice % "inpaint area")):
        expect_error(lambda: client.predict(**{**img2img, "init_image": handle_file(str(image_file)),
                                               field: traversal}), pattern)
    expect_error(lambda: client.predict(scope=traversal, api_name="/cancel"), choice % "scope")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not a picture")
    expect_error(lambda: client.predict(**{**img2img, "init_image": handle_file(str(not_an_image))}),
                 r"image|cannot identify")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20000, 20000))
    expect_error(lambda: client.predict(**{**img2img, "init_image": handle_file(str(bomb))}),
                 r"pixels|decompression bomb")
    for upload in (bomb, not_an_image):
        expect_error(lambda: client.predict(image=handle_file(str(upload)), api_name="/png_info"),
                     r"pixels|not a readable image")
        # ControlNet unit image (txt2img and img2img) and Extras, one file and a batch
        expect_error(lambda: txt2img(client, cn0_enabled=True, cn0_model="None", cn0_image=handle_file(str(upload))),
                     r"pixels|not a readable image")
        expect_error(lambda: client.predict(**{**img2img, "init_image": handle_file(str(image_file)),
                                               "cn0_enabled": True, "cn0_image": handle_file(str(upload))}),
                     r"pixels|not a readable image")
        expect_error(lambda: client.predict(image=handle_file(str(upload)), upscaler_1="Lanczos",
                                            api_name="/extras_single_image"), r"pixels|not a readable image")
        expect_error(lambda: client.predict(files=[handle_file(str(image_file)), handle_file(str(upload))],
                                            upscaler_1="Lanczos", api_name="/extras_batch_images"),
                     r"pixels|not a readable image")
    assert not shared_server.marker.exists(), "the malicious pickle ran"
    # Oversized bodies: an upload above --max-upload-mb, and a 30 MB JSON call.
    session = logged_in_session(shared_server, "u3")
    big = session.post(f"{shared_server.url}/gradio_api/upload",
                       files={"files": ("big.png", b"\0" * (26 << 20), "image/png")}, timeout=120)
    assert big.status_code in (400, 413), big.status_code
    status, stream = raw_call(shared_server, session, prompt="x" * (30 << 20))  # under --max-request-mb
    assert status != 413 and (status in (400, 422) or ("event: error" in stream and "above this server's limit" in stream))
    # NaN is not JSON, so gradio_client cannot send it; a raw call can ("NaN" literal).
    status, stream = raw_call(shared_server, session, cfg_scale=float("nan"))
    # refused before the handler (400/422) or by it (an error event); either way the reason names CFG
    assert status in (400, 422) or "event: error" in stream, (status, stream)
    assert re.search(r"cfg", stream, re.IGNORECASE), stream
    # Still serving, with the same pixels as before.
    _gallery, info = txt2img(client, prompt="still here", seed=77)
    from PIL import Image

    with Image.open(reference) as before, Image.open(info["paths"][0]) as after:
        assert before.tobytes() == after.tobytes()
    assert shared_server.process.poll() is None


def test_rest_txt2img_above_the_size_limit_is_a_422_naming_it_and_the_server_keeps_serving(shared_server):
    session = requests.Session()
    session.trust_env = False
    body = {"prompt": "too wide", "steps": 1, "width": 2048, "height": 64, "sampler_name": "Euler"}
    response = session.post(f"{shared_server.url}/sdapi/v1/txt2img", json=body, auth=("u6", PASSWORDS["u6"]),
                            timeout=120)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "width 2048" in detail and "1024" in detail and "\n" not in detail, detail
    info = rest_txt2img(shared_server, "u6", {"prompt": "after the refusal", "seed": 5, "steps": 1,
                                              "checkpoint": "tinyA"})
    assert info["prompt"] == "after the refusal" and info["width"] == 64
    assert shared_server.process.poll() is None


# --- path traversal in every name field: an error or an unknown name, and nothing read --------

TRAVERSAL = "../../etc/passwd"
MARKER = b"root:x:0:0:MARKER-NOT-TO-BE-READ\n"
MARKER_SUFFIXES = ("", ".safetensors", ".pt", ".ckpt", ".pth", ".bin", ".txt", ".csv", ".json")


def plant_markers(server) -> list[Path]:
    """Files where `../../etc/passwd` (and `__../../x__`) would land if any name were joined
    onto a models, embeddings or wildcards folder: above the data dir and inside it. Their
    access time is set before their modification time, so the first read moves it (relatime)."""
    root = server.data_dir.parent
    targets = [base / "etc" / f"passwd{suffix}" for base in (root, server.data_dir, server.data_dir / "models")
               for suffix in MARKER_SUFFIXES]
    targets += [base / f"x{suffix}" for base in (root, server.data_dir) for suffix in (".txt", "")]
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(MARKER)
        stat = path.stat()
        os.utime(path, ns=(stat.st_mtime_ns - 10**12, stat.st_mtime_ns))
    return targets


def unread(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.stat().st_atime_ns >= p.stat().st_mtime_ns]


def refused_or_unknown(call, pattern: str) -> str:
    """A short error matching `pattern`, or a result (the name was taken as an unknown word)."""
    from gradio_client.exceptions import AppError

    try:
        result = call()
    except AppError as exc:
        message = str(exc)
        assert re.search(pattern, message, re.IGNORECASE), message
        # Gradio's own "not in the list of choices" names every choice: one line, a little longer
        limit = 1000 if "list of choices" in message else 400
        assert "\n" not in message and len(message) < limit and "Traceback" not in message
        return message
    assert MARKER.decode().strip() not in json.dumps(result, default=str)
    return "accepted"


def test_path_traversal_in_every_name_field_reads_nothing_and_the_server_keeps_serving(shared_server, clients,
                                                                                        tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    markers = plant_markers(shared_server)
    assert not unread(markers)
    client = clients[5]
    before = txt2img(client, prompt="still here", seed=78)[1]["paths"][0]
    hires = dict(enable_hr=True, hr_upscaler="Latent", hr_scale=1.5, denoising_strength=0.5)
    choices = r"is not in the list of choices|not found|unknown|not a"
    fields = {
        "hr_checkpoint": (dict(hires, hr_checkpoint=TRAVERSAL), choices),
        "hr_sampler": (dict(hires, hr_sampler=TRAVERSAL), choices + "|sampler"),
        "hr_upscaler": (dict(hires, hr_upscaler=TRAVERSAL), choices + "|upscaler"),
        # refused before any lookup here: a refiner needs an SDXL base
        "refiner_checkpoint": (dict(refiner_checkpoint=TRAVERSAL), choices + "|refiner"),
        "gligen_model": (dict(gligen_model=TRAVERSAL, gligen_boxes="a box: 0.1, 0.1, 0.5, 0.5"), choices + "|GLIGEN"),
        "styles": (dict(styles=[TRAVERSAL]), choices + "|style"),
        "ControlNet model": (dict(cn0_enabled=True, cn0_model=TRAVERSAL, cn0_module="none",
                                  cn0_image=handle_file(before)), choices + "|ControlNet"),
        "ControlNet module": (dict(cn0_enabled=True, cn0_model="None", cn0_module=TRAVERSAL,
                                   cn0_image=handle_file(before)), choices + "|preprocessor"),
        "LoRA tag": (dict(prompt=f"a cat <lora:{TRAVERSAL}:1>"), choices + "|LoRA"),
        "hypernetwork tag": (dict(prompt=f"a cat <hypernet:{TRAVERSAL}:1>"), choices + "|hypernet"),
        "embedding-like word": (dict(prompt=f"a cat, {TRAVERSAL}, (..\\..\\etc\\passwd:1.2)"), choices),
        "wildcard": (dict(prompt="a cat __../../x__ and __../../etc/passwd__"), choices + "|wildcard"),
    }
    outcomes = {name: refused_or_unknown(lambda: txt2img(client, **changes), pattern)
                for name, (changes, pattern) in fields.items()}
    for field in ("upscaler_1", "upscaler_2"):
        options = {"upscaler_1": "Lanczos", field: TRAVERSAL, "extras_upscaler_2_visibility": 0.5}
        outcomes[f"Extras {field}"] = refused_or_unknown(
            lambda: client.predict(image=handle_file(before), **options, api_name="/extras_single_image"),
            choices + "|upscaler")
    # REST: per-request overrides as a user, the API-wide default as the admin.
    session = requests.Session()
    session.trust_env = False
    body = {"prompt": "p", "steps": 1, "width": 64, "height": 64}
    for key in ("sd_model_checkpoint", "sd_vae"):
        response = session.post(f"{shared_server.url}/sdapi/v1/txt2img", auth=("u5", PASSWORDS["u5"]), timeout=120,
                                json={**body, "override_settings": {key: TRAVERSAL}})
        assert response.status_code == 422 and "not found" in response.json()["detail"], response.text
        outcomes[f"REST override {key}"] = response.json()["detail"]
        response = session.post(f"{shared_server.url}/sdapi/v1/options", auth=("root", PASSWORDS["root"]),
                                json={key: TRAVERSAL}, timeout=120)
        assert response.status_code == 422 and "not found" in response.json()["detail"], response.text
        outcomes[f"REST options {key}"] = response.json()["detail"]
    response = session.post(f"{shared_server.url}/sdapi/v1/extra-single-image", auth=("u5", PASSWORDS["u5"]),
                            json={"image": TRAVERSAL, "upscaler_1": TRAVERSAL}, timeout=120)
    assert response.status_code == 422, response.text

    assert unread(markers) == [], outcomes  # nothing outside the model folders was opened
    after = txt2img(client, prompt="still here", seed=78)[1]["paths"][0]
    with Image.open(before) as a, Image.open(after) as b:
        assert a.tobytes() == b.tobytes()
    assert shared_server.process.poll() is None


# --- limits on what a request may send --------------------------------------------------------

def test_bodies_above_max_request_mb_get_413_on_rest_and_gradio_routes(shared_server):
    session = logged_in_session(shared_server, "u6")
    big = b'{"prompt": "' + b"x" * ((MAX_REQUEST_MB << 20) + 1024) + b'"}'
    rest = session.post(f"{shared_server.url}/sdapi/v1/txt2img", data=big, auth=("u6", PASSWORDS["u6"]),
                        headers={"Content-Type": "application/json"}, timeout=120)
    assert rest.status_code == 413 and "max_request_mb" in rest.json()["detail"]
    call = session.post(f"{shared_server.url}/gradio_api/call/txt2img", data=big,
                        headers={"Content-Type": "application/json"}, timeout=120)
    assert call.status_code == 413

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(MAX_REQUEST_MB + 1):
            yield b"\0" * (1 << 20)

    upload = session.post(f"{shared_server.url}/gradio_api/upload", data=chunks(),
                          headers={"Content-Type": "application/octet-stream"}, timeout=120)
    assert upload.status_code == 413
    assert session.get(f"{shared_server.url}/gradio_api/info", timeout=30).ok  # still serving


def test_uploads_land_in_the_data_dirs_gradio_temp_folder(shared_server, tmp_path):
    from PIL import Image

    session = logged_in_session(shared_server, "u6")
    name = f"upload-{os.getpid()}-{time.monotonic_ns()}.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name)
    with open(tmp_path / name, "rb") as handle:
        response = session.post(f"{shared_server.url}/gradio_api/upload", files={"files": (name, handle, "image/png")},
                                timeout=60)
    assert response.ok, response.text
    (stored,) = [Path(p) for p in response.json()]
    assert stored.resolve().is_relative_to((shared_server.data_dir / "tmp" / "gradio").resolve()), stored
    assert stored.read_bytes() == (tmp_path / name).read_bytes()
    assert not list(Path("/tmp/gradio").glob(f"**/{name}"))


# --- REST: what everyone shares is for the admin -----------------------------------------------

def test_rest_model_changes_and_cancel_all_are_for_the_admin(shared_server):
    session = requests.Session()
    session.trust_env = False
    url = f"{shared_server.url}/sdapi/v1"
    user, admin = ("u7", PASSWORDS["u7"]), ("root", PASSWORDS["root"])
    options = session.get(f"{url}/options", auth=user, timeout=30).json()
    assert session.post(f"{url}/options", json=options, auth=user, timeout=60).status_code == 200  # no change
    for path, body in (("options", {"sd_model_checkpoint": "tinyB"}), ("unload-checkpoint", None),
                       ("reload-checkpoint", None), ("cancel-all", None)):
        response = session.post(f"{url}/{path}", json=body, auth=user, timeout=60)
        assert response.status_code == 403 and "only admins" in response.json()["detail"], (path, response.text)
    assert session.get(f"{url}/options", auth=user, timeout=30).json()["sd_model_checkpoint"] == \
        options["sd_model_checkpoint"]
    assert session.post(f"{url}/options", json={"sd_model_checkpoint": "tinyB"}, auth=admin, timeout=120).ok
    assert session.get(f"{url}/options", auth=user, timeout=30).json()["sd_model_checkpoint"].startswith("tinyB")
    assert session.post(f"{url}/cancel-all", auth=admin, timeout=30).json() == {"cancelled": 0}


def test_a_user_cannot_overwrite_a_shared_checkpoint_through_the_merger(shared_server):
    """Overwriting replaces the model for everyone: admin only."""
    import hashlib

    target = shared_server.data_dir / "models" / "Stable-diffusion" / "tinyB.safetensors"
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    message = expect_error(lambda: connect(shared_server, "u5").predict(
        primary="tinyA", secondary="tinyC", multiplier=0.5, output_name="tinyB", overwrite=True,
        api_name="/merge_checkpoints"), r"only admins .*overwrite a model")
    assert "admin" in message
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    # Gradio hands the handler the logged-in name: the admin may overwrite (a model of their own,
    # so tinyB stays as the other tests expect it)
    root = connect(shared_server, "root")
    merge = dict(primary="tinyA", secondary="tinyC", multiplier=0.5, output_name="root mix",
                 api_name="/merge_checkpoints")
    assert root.predict(**merge)[0] == "Saved root mix.safetensors"
    assert root.predict(**merge, overwrite=True)[0] == "Saved root mix.safetensors"
    expect_error(lambda: connect(shared_server, "u5").predict(**merge, overwrite=True), "only admins")
    assert shared_server.process.poll() is None
