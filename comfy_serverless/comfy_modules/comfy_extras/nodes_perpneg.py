"""ComfyUI's `comfy_extras.nodes_perpneg`: PerpNeg (comfy_serverless/nodes/model_patches.py) and PerpNegGuider
(comfy_serverless/nodes/guidance_extra.py), and `Guider_PerpNeg`, the GUIDER class packs subclass (comfy.samplers'
face over this server's Perp-Neg guider). Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.guidance_extra import PerpNegGuider
from comfy_serverless.nodes.model_patches import PerpNeg

NODE_CLASS_MAPPINGS = {
    "PerpNeg": PerpNeg,
    "PerpNegGuider": PerpNegGuider,
}


def __getattr__(name: str):
    if name == "Guider_PerpNeg":  # needs torch: resolved on first use
        from comfy.samplers import _pack_guider_class

        from comfy_serverless.models.guidance_functions import PerpNegGuider as Ours

        return _pack_guider_class(Ours)
    return missing_attribute(__name__, name)
