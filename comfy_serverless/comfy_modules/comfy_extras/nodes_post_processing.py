"""ComfyUI's `comfy_extras.nodes_post_processing`: Blend (ImageBlend), Blur (ImageBlur), Quantize (ImageQuantize),
Sharpen (ImageSharpen) and ImageScaleToTotalPixels; the module's other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.image_ops import ImageBlend as Blend
from comfy_serverless.nodes.image_ops import ImageQuantize as Quantize
from comfy_serverless.nodes.image_ops import ImageScaleToTotalPixels
from comfy_serverless.nodes.images import ImageBlur as Blur
from comfy_serverless.nodes.images import ImageSharpen as Sharpen

NODE_CLASS_MAPPINGS = {
    "ImageBlend": Blend,
    "ImageBlur": Blur,
    "ImageQuantize": Quantize,
    "ImageSharpen": Sharpen,
    "ImageScaleToTotalPixels": ImageScaleToTotalPixels,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
