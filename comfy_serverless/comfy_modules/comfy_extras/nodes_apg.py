"""ComfyUI's `comfy_extras.nodes_apg`: APG (comfy_serverless/nodes/guidance_extra.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.guidance_extra import APG

NODE_CLASS_MAPPINGS = {
    "APG": APG,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
