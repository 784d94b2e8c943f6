"""A stand-in for ComfyUI's main.py: CI cannot install ComfyUI, so this checkout runs comfy-serverless itself,
started with the arguments the front gives ComfyUI (--listen, --port, --input-directory, --output-directory,
--temp-directory, --extra-model-paths-config, ...). Its own folder is the base directory, so it loads the node
packs in its custom_nodes/ (which the front does not load), as ComfyUI would.
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
os.execv(sys.executable, [sys.executable, "-m", "comfy_serverless", "serve", "--base-directory", here,
                          "--warmup", "lazy", "--dont-print-server", *sys.argv[1:]])
