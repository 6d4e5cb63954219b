#!/usr/bin/env bash
# One entry point for people and CI. Creates ./.venv on first use (or when pyproject.toml changed).
#   ./run.sh demo [hbfungi demo options]   segment the embedded demo scenes; writes outputs/demo/
#   ./run.sh test [pytest options]         run the test suite
#   ./run.sh hbfungi ARGS...               any hbfungi command inside the environment
set -euo pipefail
cd "$(dirname "$0")"
VENV="${HBFUNGI_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.hbfungi-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[run.sh] setting up $VENV (first run downloads torch, ~2 min)" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
cmd="${1:-demo}"
shift || true
case "$cmd" in
    demo) exec "$VENV/bin/hbfungi" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    hbfungi) exec "$VENV/bin/hbfungi" "$@" ;;
    *) echo "usage: ./run.sh demo|test|hbfungi ..." >&2; exit 2 ;;
esac
