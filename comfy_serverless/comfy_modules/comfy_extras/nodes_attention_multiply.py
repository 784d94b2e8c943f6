"""ComfyUI's `comfy_extras.nodes_attention_multiply`: the attention multiply nodes
(comfy_serverless/nodes/model_patches.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.model_patches import (
    CLIPAttentionMultiply,
    UNetCrossAttentionMultiply,
    UNetSelfAttentionMultiply,
)

NODE_CLASS_MAPPINGS = {
    "UNetSelfAttentionMultiply": UNetSelfAttentionMultiply,
    "UNetCrossAttentionMultiply": UNetCrossAttentionMultiply,
    "CLIPAttentionMultiply": CLIPAttentionMultiply,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
