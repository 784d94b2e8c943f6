"""ComfyUI's `comfy_extras.nodes_model_advanced`: ModelSamplingDiscrete and RescaleCFG
(comfy_serverless/nodes/model_patches.py), ModelSamplingContinuousEDM and ModelSamplingContinuousV
(nodes/model_sampling_extra.py), ModelComputeDtype (nodes/debug_model_nodes.py). Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.debug_model_nodes import ModelComputeDtype
from comfy_serverless.nodes.model_patches import ModelSamplingDiscrete, RescaleCFG
from comfy_serverless.nodes.model_sampling_extra import ModelSamplingContinuousEDM, ModelSamplingContinuousV

NODE_CLASS_MAPPINGS = {
    "ModelSamplingDiscrete": ModelSamplingDiscrete,
    "ModelSamplingContinuousEDM": ModelSamplingContinuousEDM,
    "ModelSamplingContinuousV": ModelSamplingContinuousV,
    "RescaleCFG": RescaleCFG,
    "ModelComputeDtype": ModelComputeDtype,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
