"""ComfyUI's `comfy_extras.nodes_lora_extract`: LoraSave (comfy_serverless/nodes/lora_extract_nodes.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.lora_extract_nodes import LoraSave

NODE_CLASS_MAPPINGS = {
    "LoraSave": LoraSave,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
