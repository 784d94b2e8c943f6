#!/usr/bin/env bash
# Creates .venv at the repository root and installs comfy-serverless into it (idempotent; fast when
# nothing changed). Usage: scripts/setup.sh [--test]   (--test adds the test-only dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi

stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)${extras:+-test}"
# An install with the test extras also serves the plain command (./serve.sh after ./test.sh).
if [ ! -f "$stamp" ] && [ ! -f "$stamp-test" ]; then
  # torch is pinned to 2.13.0 in pyproject.toml: the CPU build of that release installs from local disk here.
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}" --config-settings editable_mode=compat
  # Precompiled bytecode is part of the cold-start story (PYTHONDONTWRITEBYTECODE=1 is set here). The
  # dependencies change only with an install, so they are compiled once per install, not per start.
  # Some ship files for newer Pythons (torch's py312_intrinsics.py), which cannot compile here.
  .venv/bin/python -m compileall -q -j0 .venv/lib/python3.*/site-packages >/dev/null 2>&1 || true
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The project's own modules: compileall only rewrites the files that changed since the last run.
.venv/bin/python -m compileall -q -j0 comfy_serverless >/dev/null
# The node catalogue the server starts from; this returns at once when no node pack changed.
.venv/bin/comfy-serverless snapshot --log-stdout --verbose WARNING
