"""ComfyUI's `comfy_extras.nodes_cfg`: CFGZeroStar and CFGNorm (comfy_serverless/nodes/model_patches.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_patches import CFGNorm, CFGZeroStar

NODE_CLASS_MAPPINGS = {
    "CFGZeroStar": CFGZeroStar,
    "CFGNorm": CFGNorm,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
