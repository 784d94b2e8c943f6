"""ComfyUI's `comfy_execution` package for custom node packs: graph helpers over comfy_serverless.engine.

Submodules without a file here (`comfy_execution.caching`, `comfy_execution.progress`, ...) are placeholders
(comfy_serverless/catalog/comfy_modules.py).
"""

from comfy_serverless.catalog.comfy_modules import package_attribute


def __getattr__(name: str):
    return package_attribute(__name__, name)
