"""ComfyUI's `comfy_extras.nodes_rebatch`: ImageRebatch (RebatchImages) and LatentRebatch (RebatchLatents)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.images import RebatchImages as ImageRebatch
from comfy_serverless.nodes.latent_ops import RebatchLatents as LatentRebatch

NODE_CLASS_MAPPINGS = {"RebatchImages": ImageRebatch, "RebatchLatents": LatentRebatch}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
