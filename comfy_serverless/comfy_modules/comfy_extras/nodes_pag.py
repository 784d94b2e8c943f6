"""ComfyUI's `comfy_extras.nodes_pag`: PerturbedAttentionGuidance (comfy_serverless/nodes/model_patches.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_patches import PerturbedAttentionGuidance

NODE_CLASS_MAPPINGS = {
    "PerturbedAttentionGuidance": PerturbedAttentionGuidance,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
