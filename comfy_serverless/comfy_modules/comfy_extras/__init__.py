"""ComfyUI's `comfy_extras` package for custom node packs: the extra core nodes this server has, under the
modules ComfyUI keeps them in (every nodes_*.py file in this folder re-exports ours; the README's module table
lists them). Other modules are placeholders (comfy_serverless/catalog/comfy_modules.py).
"""

from comfy_serverless.catalog.comfy_modules import package_attribute


def __getattr__(name: str):
    return package_attribute(__name__, name)
