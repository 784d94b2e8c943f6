"""ComfyUI's `comfy_extras.nodes_mahiro`: Mahiro (comfy_serverless/nodes/guidance_extra.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.guidance_extra import Mahiro

NODE_CLASS_MAPPINGS = {
    "Mahiro": Mahiro,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
