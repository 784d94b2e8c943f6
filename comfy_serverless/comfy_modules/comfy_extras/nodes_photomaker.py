"""ComfyUI's `comfy_extras.nodes_photomaker`: PhotoMakerLoader and PhotoMakerEncode
(comfy_serverless/nodes/photomaker_nodes.py)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.photomaker_nodes import PhotoMakerEncode, PhotoMakerLoader

NODE_CLASS_MAPPINGS = {
    "PhotoMakerLoader": PhotoMakerLoader,
    "PhotoMakerEncode": PhotoMakerEncode,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
