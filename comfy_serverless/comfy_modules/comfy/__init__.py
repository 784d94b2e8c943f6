"""ComfyUI's `comfy` package for custom node packs: thin faces over comfy_serverless's own modules.

`comfy.utils`, `comfy.model_management`, `comfy.samplers`, `comfy.sample`, `comfy.sd`, `comfy.model_patcher`,
`comfy.cli_args` and `comfy.comfy_types` have files here; every other submodule (`comfy.model_base`,
`comfy.ldm...`) is a placeholder (comfy_serverless/catalog/comfy_modules.py).
"""

from comfy_serverless.catalog.comfy_modules import package_attribute


def __getattr__(name: str):
    """`import comfy` then `comfy.samplers.KSampler`: packs rely on submodules being reachable this way."""
    return package_attribute(__name__, name)
