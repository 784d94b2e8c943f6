"""ComfyUI's `comfy_extras.nodes_ip2p`: InstructPixToPixConditioning (comfy_serverless/nodes/conditioning.py)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.conditioning import InstructPixToPixConditioning

NODE_CLASS_MAPPINGS = {"InstructPixToPixConditioning": InstructPixToPixConditioning}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
