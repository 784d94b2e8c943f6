"""ComfyUI's `comfy_extras.nodes_perpneg`: PerpNeg (comfy_serverless/nodes/model_patches.py) and PerpNegGuider
(comfy_serverless/nodes/guidance_extra.py). Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.guidance_extra import PerpNegGuider
from comfy_serverless.nodes.model_patches import PerpNeg

NODE_CLASS_MAPPINGS = {
    "PerpNeg": PerpNeg,
    "PerpNegGuider": PerpNegGuider,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
