"""ComfyUI's `comfy_extras.nodes_hypernetwork`: HypernetworkLoader (comfy_serverless/nodes/loaders_extra.py) and
load_hypernetwork_patch (comfy_serverless/models/hypernetwork.py)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.loaders_extra import HypernetworkLoader

NODE_CLASS_MAPPINGS = {"HypernetworkLoader": HypernetworkLoader}


def load_hypernetwork_patch(path, strength):
    from comfy_serverless.models.hypernetwork import load_hypernetwork

    return load_hypernetwork(path, strength)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
