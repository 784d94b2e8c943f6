"""ComfyUI's `comfy_extras` package for custom node packs: the extra core nodes this server has, under the
modules ComfyUI keeps them in (nodes_mask, nodes_images, nodes_post_processing, nodes_rebatch, nodes_primitive).
Other modules are placeholders (comfy_serverless/catalog/comfy_modules.py).
"""

from comfy_serverless.catalog.comfy_modules import package_attribute


def __getattr__(name: str):
    return package_attribute(__name__, name)
