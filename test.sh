#!/usr/bin/env bash
# Sets up (first run only) and runs the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
