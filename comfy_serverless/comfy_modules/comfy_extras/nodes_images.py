"""ComfyUI's `comfy_extras.nodes_images`: ImageCrop; the module's other nodes are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.images import ImageCrop

NODE_CLASS_MAPPINGS = {"ImageCrop": ImageCrop}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
