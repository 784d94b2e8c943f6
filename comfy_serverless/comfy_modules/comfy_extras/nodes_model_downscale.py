"""ComfyUI's `comfy_extras.nodes_model_downscale`: PatchModelAddDownscale (comfy_serverless/nodes/model_patches.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_patches import PatchModelAddDownscale

NODE_CLASS_MAPPINGS = {
    "PatchModelAddDownscale": PatchModelAddDownscale,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
