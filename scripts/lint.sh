#!/usr/bin/env bash
# Lint (ruff, whole repository) and type check (mypy, the light modules), both configured in pyproject.toml.
# ./test.sh runs this before pytest, so a finding fails the test run. Needs `scripts/setup.sh --test`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
