"""ComfyUI's `comfy_extras.nodes_preview_any`: PreviewAny."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.strings import PreviewAny

NODE_CLASS_MAPPINGS = {"PreviewAny": PreviewAny}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
