"""ComfyUI's `comfy_extras.nodes_clip_sdxl`: CLIPTextEncodeSDXL and CLIPTextEncodeSDXLRefiner
(comfy_serverless/nodes/sdxl_nodes.py)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.sdxl_nodes import CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner

NODE_CLASS_MAPPINGS = {
    "CLIPTextEncodeSDXLRefiner": CLIPTextEncodeSDXLRefiner,
    "CLIPTextEncodeSDXL": CLIPTextEncodeSDXL,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
