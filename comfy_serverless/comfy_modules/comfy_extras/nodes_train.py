"""ComfyUI's `comfy_extras.nodes_train`: the training-data loaders (comfy_serverless/nodes/training_data.py).
Other names (TrainLoraNode, LoraModelLoader, ...) are placeholders: this server does not train."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.training_data import LoadImageSetFromFolderNode, LoadImageTextSetFromFolderNode

NODE_CLASS_MAPPINGS = {
    "LoadImageSetFromFolderNode": LoadImageSetFromFolderNode,
    "LoadImageTextSetFromFolderNode": LoadImageTextSetFromFolderNode,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
