"""A shared, logged-in server under load and attack, on loopback.

The server runs with `--share --auth-file` while every proxy points at a closed port, so the
share tunnel fails as it does offline and the app must keep serving locally. Nine users (one
admin), three tiny checkpoints, and a models folder holding broken and malicious files.

Policy tested here (README "Sharing safely"): the outputs folder is shared between logged-in
users, as in A1111; nothing else on disk is served, and nobody is served without logging in.
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
from tests.e2e.conftest import REPO_ROOT, Server, free_port, wait_until_serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = 8
REQUESTS_PER_CLIENT = 5
CHECKPOINTS = ("tinyA", "tinyB", "tinyC")
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
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys, app; sys.exit(app.main(sys.argv[1:]))",
             "--data-dir", str(data_dir), "--port", str(port), "--device", "cpu", "--share",
             "--auth-file", str(users), "--max-queued-per-user", str(REQUESTS_PER_CLIENT),
             "--max-width", "1024", "--max-steps", "100", "--api"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}", data_dir=data_dir, log=log, process=process)
    server.marker = marker
    server.users_file = users
    try:
        wait_until_serving(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def connect(server, user: str):
    from gradio_client import Client

    return Client(server.url, auth=(user, PASSWORDS[user]), verbose=False)


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


def test_eight_clients_five_requests_each_get_their_own_results_in_fair_turns(shared_server, clients):
    """Even clients use gradio_client, odd ones the REST API, all at once."""
    from PIL import Image

    rest = ThreadPoolExecutor(CLIENTS // 2 * REQUESTS_PER_CLIENT)
    jobs = []
    # Each client queues all of its requests at once, one client after the other: first-come
    # would run the last client's first request ~36th; round robin runs it in the first round.
    for i, client in enumerate(clients):
        for j in range(REQUESTS_PER_CLIENT):
            request = dict(prompt=f"client {i} request {j}", seed=1000 * i + j, steps=1 + (i + j) % 2,
                           checkpoint=CHECKPOINTS[(i + j) % len(CHECKPOINTS)])
            if i % 2:
                jobs.append((i, j, request, rest.submit(rest_txt2img, shared_server, f"u{i}", request)))
            else:
                jobs.append((i, j, request, client.submit(**{**BASE, **request}, api_name="/txt2img")))
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
        with Image.open(saved) as image:
            assert read_infotext(image) == text
        finished.append((int(saved.name.split("-")[0]), i, j))
    rest.shutdown()
    assert len(finished) == CLIENTS * REQUESTS_PER_CLIENT
    assert len({number for number, _i, _j in finished}) == len(finished)  # nothing overwritten
    order = [i for _number, i, _j in sorted(finished)]
    for i in range(CLIENTS):
        turns = [index for index, owner in enumerate(order) if owner == i]
        # The k-th request of every client finishes within round k (+ one round of slack for
        # requests that arrived while the first round ran).
        for k, index in enumerate(turns):
            assert index < CLIENTS * (k + 2), (i, turns, order)


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
    assert not shared_server.marker.exists(), "the malicious pickle ran"
    # Oversized bodies: an upload above --max-upload-mb, and a 30 MB JSON call.
    session = logged_in_session(shared_server, "u3")
    big = session.post(f"{shared_server.url}/gradio_api/upload",
                       files={"files": ("big.png", b"\0" * (26 << 20), "image/png")}, timeout=120)
    assert big.status_code in (400, 413), big.status_code
    status, stream = raw_call(shared_server, session, prompt="x" * (30 << 20))
    assert status in (400, 413, 422) or ("event: error" in stream and "above this server's limit" in stream)
    # NaN is not JSON, so gradio_client cannot send it; a raw call can ("NaN" literal).
    status, stream = raw_call(shared_server, session, cfg_scale=float("nan"))
    assert status in (400, 422) or ("event: error" in stream and "CFG scale must be between 0 and 100" in stream)
    # Still serving, with the same pixels as before.
    _gallery, info = txt2img(client, prompt="still here", seed=77)
    from PIL import Image

    with Image.open(reference) as before, Image.open(info["paths"][0]) as after:
        assert before.tobytes() == after.tobytes()
    assert shared_server.process.poll() is None
