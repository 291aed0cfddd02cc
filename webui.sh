#!/usr/bin/env bash
# Easel set-up and launcher.
#   ./webui.sh [flags]        create .venv if needed, install, start the app (python app.py flags)
#   ./webui.sh test [args]    the same set-up plus test requirements and Chromium, then pytest args
# Installs are skipped when the stamp in .venv matches the requirements files, so repeated
# runs start at once. Set PYTHON to choose the interpreter (3.10 or newer; default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT="$(pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '[webui.sh] %s\n' "$*" >&2; }

create_venv() {
    if [[ -x "$PY" ]]; then
        return
    fi
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        say "Python 3.10 or newer is needed ('$python' is missing or older); set PYTHON=/path/to/python3.11"
        exit 1
    fi
    say "creating $VENV"
    if ! "$python" -m venv "$VENV"; then
        rm -rf "$VENV"
        say "could not create the virtual environment; on Debian/Ubuntu: apt-get install python3-venv"
        exit 1
    fi
}

# torch first, so the rest of requirements.txt does not pull a different build: one pinned
# torch + torchvision pair on every machine (CPU or NVIDIA GPU). torchvision is what spandrel
# (upscalers) and controlnet_aux (ControlNet annotators) need, and 2.14.1 + 0.29.1 is the newest
# pair that installs together here; the same build runs on the CPU when there is no GPU.
TORCH_PACKAGES=(torch==2.14.1 torchvision==0.29.1)

stamp_of() {  # a hash of the given files plus extra words: changes when any of them changes
    local extra="$1"
    shift
    { cat "$@"; echo "$extra"; } | sha256sum | cut -d' ' -f1
}

install_app() {
    local stamp_file="$VENV/.easel-installed" stamp
    stamp="$(stamp_of "${TORCH_PACKAGES[*]}" requirements.txt requirements-nodeps.txt)"
    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
        return
    fi
    say "installing ${TORCH_PACKAGES[*]} and requirements.txt (the first time takes a few minutes)"
    "$PY" -m pip install -q "${TORCH_PACKAGES[@]}"
    "$PY" -m pip install -q -r requirements.txt
    "$PY" -m pip install -q --no-deps -r requirements-nodeps.txt
    echo "$stamp" > "$stamp_file"
}

install_tests() {
    local stamp_file="$VENV/.easel-tests-installed" stamp
    stamp="$(stamp_of "$(cat "$VENV/.easel-installed")" requirements-test.txt)"
    if [[ ! -f "$stamp_file" || "$(cat "$stamp_file")" != "$stamp" ]]; then
        say "installing requirements-test.txt"
        "$PY" -m pip install -q -r requirements-test.txt
        echo "$stamp" > "$stamp_file"
    fi
    ensure_chromium
}

# The browser test drives Debian's chromium through Playwright (never `playwright install`,
# which downloads a browser). Without it that one test skips and says why.
ensure_chromium() {
    if command -v chromium >/dev/null 2>&1; then
        return
    fi
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian chromium for the browser test"
        if ! apt-get install -y chromium >/dev/null 2>&1; then
            apt-get update >/dev/null 2>&1 || true
            apt-get install -y chromium >/dev/null 2>&1 \
                || say "could not install chromium; the browser test will be skipped"
        fi
    else
        say "chromium is not installed and this is not root: the browser test will be skipped" \
            "(install it with: sudo apt-get install -y chromium)"
    fi
}

create_venv
install_app

if [[ "${1:-}" == "test" ]]; then
    shift
    install_tests
    set +e
    "$PY" -m pytest "$@"
    status=$?
    set -e
    exit "$status"
fi

exec "$PY" app.py "$@"
