"""ComfyUI's `comfy_extras.nodes_images`: ImageCrop, the batch, transform and animated-save nodes and
GetImageSize. SaveSVGNode and the module's other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.image_ops import GetImageSize, ImageAddNoise, ImageFromBatch, RepeatImageBatch
from comfy_serverless.nodes.image_saving import SaveAnimatedPNG, SaveAnimatedWEBP
from comfy_serverless.nodes.image_transform import (
    ImageFlip,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageStitch,
    ResizeAndPadImage,
)
from comfy_serverless.nodes.images import ImageCrop

NODE_CLASS_MAPPINGS = {
    "ImageCrop": ImageCrop,
    "RepeatImageBatch": RepeatImageBatch,
    "ImageFromBatch": ImageFromBatch,
    "ImageAddNoise": ImageAddNoise,
    "SaveAnimatedWEBP": SaveAnimatedWEBP,
    "SaveAnimatedPNG": SaveAnimatedPNG,
    "ImageStitch": ImageStitch,
    "ResizeAndPadImage": ResizeAndPadImage,
    "GetImageSize": GetImageSize,
    "ImageRotate": ImageRotate,
    "ImageFlip": ImageFlip,
    "ImageScaleToMaxDimension": ImageScaleToMaxDimension,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
