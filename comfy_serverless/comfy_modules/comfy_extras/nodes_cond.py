"""ComfyUI's `comfy_extras.nodes_cond`: CLIPTextEncodeControlnet (comfy_serverless/nodes/gligen_nodes.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.gligen_nodes import CLIPTextEncodeControlnet

NODE_CLASS_MAPPINGS = {"CLIPTextEncodeControlnet": CLIPTextEncodeControlnet}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
