"""ComfyUI's `comfy_extras.nodes_sdupscale`: SD_4XUpscale_Conditioning (comfy_serverless/nodes/upscale_diffusion.py)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.upscale_diffusion import SD_4XUpscale_Conditioning

NODE_CLASS_MAPPINGS = {"SD_4XUpscale_Conditioning": SD_4XUpscale_Conditioning}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
