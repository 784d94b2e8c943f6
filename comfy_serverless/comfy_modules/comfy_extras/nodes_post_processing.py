"""ComfyUI's `comfy_extras.nodes_post_processing`: Blur (ImageBlur) and Sharpen (ImageSharpen); Blend, Quantize
and the module's other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.images import ImageBlur as Blur
from comfy_serverless.nodes.images import ImageSharpen as Sharpen

NODE_CLASS_MAPPINGS = {"ImageBlur": Blur, "ImageSharpen": Sharpen}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
