"""ComfyUI's `comfy_extras.nodes_model_merging_model_specific`: ModelMergeSD1, ModelMergeSD2 and ModelMergeSDXL
(comfy_serverless/nodes/model_merging.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_merging import ModelMergeSD1, ModelMergeSD2, ModelMergeSDXL

NODE_CLASS_MAPPINGS = {
    "ModelMergeSD1": ModelMergeSD1,
    "ModelMergeSD2": ModelMergeSD2,
    "ModelMergeSDXL": ModelMergeSDXL,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
