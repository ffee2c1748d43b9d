#!/usr/bin/env bash
# The README's two commands:  ./dev.sh demo   and   ./dev.sh test
# Works on a fresh machine with Python 3.11 and apt: installs redis-server (apt) if missing,
# creates .venv, installs the project with its pinned dependencies, then runs the command.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_system() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  "$PY" -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]} with apt-get" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_venv() {
  local stamp=.venv/.ctrserve-installed want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch==2.13.0 (CPU) is pinned in pyproject; pip's configured find-links supply the wheel here
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    ensure_system; ensure_venv
    exec .venv/bin/ctrserve demo "$@" ;;
  test)
    ensure_system; ensure_venv
    exec .venv/bin/python -m pytest "$@" ;;
  *)
    echo "usage: ./dev.sh demo [options]   run the main job end to end" >&2
    echo "       ./dev.sh test [pytest args] run the test suite (-m quick for the fast subset)" >&2
    exit 2 ;;
esac
