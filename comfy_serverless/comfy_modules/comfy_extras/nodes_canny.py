"""ComfyUI's `comfy_extras.nodes_canny`: Canny (our own torch implementation, no kornia)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.image_filters import Canny

NODE_CLASS_MAPPINGS = {"Canny": Canny}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
