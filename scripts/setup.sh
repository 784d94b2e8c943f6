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
if [ ! -f "$stamp" ]; then
  # torch is pinned to 2.13.0 in pyproject.toml: the CPU build of that release installs from local disk here.
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}" --config-settings editable_mode=compat
  # The CLIP BPE vocabulary ships inside this wheel; we read the data file and never import the package
  # (it depends on torchvision, which would replace torch), hence --no-deps.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps open_clip_torch==3.3.0
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Precompiled bytecode is part of the cold-start story: PYTHONDONTWRITEBYTECODE=1 would otherwise leave the
# project's own modules uncompiled forever.
.venv/bin/python -m compileall -q -j0 comfy_serverless >/dev/null
# Some dependencies ship files for newer Pythons (torch's py312_intrinsics.py), which cannot compile here.
.venv/bin/python -m compileall -q -j0 .venv/lib/python3.*/site-packages >/dev/null 2>&1 || true
# The node catalogue the server starts from (rebuilt automatically when node packs change).
.venv/bin/comfy-serverless snapshot --log-stdout --verbose WARNING
