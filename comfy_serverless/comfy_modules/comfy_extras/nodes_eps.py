"""ComfyUI's `comfy_extras.nodes_eps`: Epsilon Scaling (comfy_serverless/nodes/model_patches.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_patches import EpsilonScaling

NODE_CLASS_MAPPINGS = {
    "Epsilon Scaling": EpsilonScaling,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
