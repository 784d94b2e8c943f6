"""ComfyUI's `comfy_extras.nodes_mask`: the mask nodes (comfy_serverless/nodes/masks.py and mask_ops.py) and
ImageCompositeMasked and LatentCompositeMasked. The module's helper functions are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.images import ImageCompositeMasked
from comfy_serverless.nodes.latent_ops import LatentCompositeMasked
from comfy_serverless.nodes.mask_ops import (
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    MaskComposite,
    MaskPreview,
    ThresholdMask,
)
from comfy_serverless.nodes.masks import ImageToMask, InvertMask, MaskToImage, SolidMask

NODE_CLASS_MAPPINGS = {
    "LatentCompositeMasked": LatentCompositeMasked,
    "ImageCompositeMasked": ImageCompositeMasked,
    "MaskToImage": MaskToImage,
    "ImageToMask": ImageToMask,
    "ImageColorToMask": ImageColorToMask,
    "SolidMask": SolidMask,
    "InvertMask": InvertMask,
    "CropMask": CropMask,
    "MaskComposite": MaskComposite,
    "FeatherMask": FeatherMask,
    "GrowMask": GrowMask,
    "ThresholdMask": ThresholdMask,
    "MaskPreview": MaskPreview,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
