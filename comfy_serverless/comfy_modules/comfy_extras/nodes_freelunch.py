"""ComfyUI's `comfy_extras.nodes_freelunch`: FreeU and FreeU_V2 (comfy_serverless/nodes/model_patches.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_patches import FreeU, FreeU_V2

NODE_CLASS_MAPPINGS = {
    "FreeU": FreeU,
    "FreeU_V2": FreeU_V2,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
