"""ComfyUI's `comfy_extras.nodes_rebatch`: ImageRebatch (RebatchImages); LatentRebatch is a placeholder."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.images import RebatchImages as ImageRebatch

NODE_CLASS_MAPPINGS = {"RebatchImages": ImageRebatch}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
