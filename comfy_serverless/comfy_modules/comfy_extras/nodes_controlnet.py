"""ComfyUI's `comfy_extras.nodes_controlnet`: SetUnionControlNetType (ControlNetInpaintingAliMamaApply is not
provided: it needs a VAE-latent ControlNet, which this server does not load)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.controlnet_nodes import UNION_CONTROLNET_TYPES, SetUnionControlNetType  # noqa: F401

NODE_CLASS_MAPPINGS = {"SetUnionControlNetType": SetUnionControlNetType}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
