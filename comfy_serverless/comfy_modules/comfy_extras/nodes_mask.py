"""ComfyUI's `comfy_extras.nodes_mask`: the mask nodes this server has (comfy_serverless/nodes/masks.py) and
ImageCompositeMasked. The others of that module (GrowMask, FeatherMask, ...) are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.images import ImageCompositeMasked
from comfy_serverless.nodes.masks import ImageToMask, InvertMask, MaskToImage, SolidMask

NODE_CLASS_MAPPINGS = {
    "ImageCompositeMasked": ImageCompositeMasked,
    "MaskToImage": MaskToImage,
    "ImageToMask": ImageToMask,
    "SolidMask": SolidMask,
    "InvertMask": InvertMask,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
