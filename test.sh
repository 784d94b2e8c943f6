#!/usr/bin/env bash
# Sets up (first run only) and runs the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
# Lint and type check first (ruff, mypy; pyproject.toml): a finding fails the run before any test starts.
scripts/lint.sh
# podman, runc and debootstrap for the container tests (tests/deploy/test_container.py, which fail clearly
# if this could not install them).
if conf=$(scripts/container_tools.sh); then
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$conf}"
else
  echo "test.sh: scripts/container_tools.sh failed; the container tests will fail" >&2
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
