"""ComfyUI's `comfy_extras.nodes_upscale_model`: UpscaleModelLoader and ImageUpscaleWithModel (packs call
`ImageUpscaleWithModel().upscale(upscale_model, image)` and `UpscaleModelLoader().load_model(name)`)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.upscale_nodes import ImageUpscaleWithModel, UpscaleModelLoader

NODE_CLASS_MAPPINGS = {"UpscaleModelLoader": UpscaleModelLoader, "ImageUpscaleWithModel": ImageUpscaleWithModel}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
