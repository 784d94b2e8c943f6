"""ComfyUI's `comfy.model_patcher` for custom node packs.

MODEL objects here are comfy_serverless.models.DiffusionModel (ComfyUI's ModelPatcher cut down to what SD
needs: clone, LoRA patches, model_options, get_model_object("model_sampling"), model_dtype, load_device), so
`isinstance(model, ModelPatcher)` holds for them. Wrapping a network of a pack's own in a ModelPatcher, and the
patching methods this server's sampler cannot honour (set_model_sampler_cfg_function, set_model_patch,
set_model_unet_function_wrapper, add_object_patch, ...), are not provided.
"""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute, stand_in_type
from comfy_serverless.models.diffusion_model import DiffusionModel

ModelPatcher = stand_in_type("comfy.model_patcher.ModelPatcher", DiffusionModel)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
