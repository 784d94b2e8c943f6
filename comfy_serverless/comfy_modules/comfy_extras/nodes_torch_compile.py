"""ComfyUI's `comfy_extras.nodes_torch_compile`: TorchCompileModel (comfy_serverless/nodes/debug_model_nodes.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.debug_model_nodes import TorchCompileModel

NODE_CLASS_MAPPINGS = {
    "TorchCompileModel": TorchCompileModel,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
