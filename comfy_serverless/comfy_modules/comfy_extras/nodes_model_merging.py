"""ComfyUI's `comfy_extras.nodes_model_merging`: the merge and save nodes (comfy_serverless/nodes/model_merging.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_merging import (
    CheckpointSave,
    CLIPMergeAdd,
    CLIPMergeSimple,
    CLIPMergeSubtract,
    CLIPSave,
    ModelMergeAdd,
    ModelMergeBlocks,
    ModelMergeSimple,
    ModelMergeSubtract,
    ModelSave,
    VAESave,
)

NODE_CLASS_MAPPINGS = {
    "ModelMergeSimple": ModelMergeSimple,
    "ModelMergeBlocks": ModelMergeBlocks,
    "ModelMergeAdd": ModelMergeAdd,
    "ModelMergeSubtract": ModelMergeSubtract,
    "CLIPMergeSimple": CLIPMergeSimple,
    "CLIPMergeAdd": CLIPMergeAdd,
    "CLIPMergeSubtract": CLIPMergeSubtract,
    "CheckpointSave": CheckpointSave,
    "CLIPSave": CLIPSave,
    "VAESave": VAESave,
    "ModelSave": ModelSave,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
