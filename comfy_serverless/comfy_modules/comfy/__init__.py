"""ComfyUI's `comfy` package for custom node packs: thin faces over comfy_serverless's own modules.

The submodules with a file in this folder (`comfy.utils`, `comfy.model_management`, `comfy.samplers`,
`comfy.model_patcher`, `comfy.controlnet`, `comfy.clip_vision`, ...: the README's module table lists them) are
backed by this server's code; every other submodule (`comfy.model_base`, `comfy.ldm...`) is a placeholder
(comfy_serverless/catalog/comfy_modules.py).
"""

from comfy_serverless.catalog.comfy_modules import package_attribute


def __getattr__(name: str):
    """`import comfy` then `comfy.samplers.KSampler`: packs rely on submodules being reachable this way."""
    return package_attribute(__name__, name)
