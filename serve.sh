#!/usr/bin/env bash
# Sets up (first run only) and starts the server. Flags are ComfyUI's: ./serve.sh --listen 0.0.0.0 --port 8188
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/comfy-serverless serve "$@"
