"""ComfyUI's `comfy_extras.nodes_morphology`: Morphology (ImageMorphology), ImageRGBToYUV and ImageYUVToRGB."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.image_filters import Morphology
from comfy_serverless.nodes.image_ops import ImageRGBToYUV, ImageYUVToRGB

NODE_CLASS_MAPPINGS = {"Morphology": Morphology, "ImageRGBToYUV": ImageRGBToYUV, "ImageYUVToRGB": ImageYUVToRGB}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
