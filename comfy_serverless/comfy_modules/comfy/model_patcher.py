"""ComfyUI's `comfy.model_patcher` for custom node packs.

MODEL objects here are comfy_serverless.models.DiffusionModel, so `isinstance(model, ModelPatcher)` holds for
them. They answer ComfyUI's ModelPatcher methods for SD models (models/patcher_api.py): clone, the cfg / pre-cfg /
post-cfg functions, the UNet function wrapper, block and attention patches and replacements, add_object_patch
("model_sampling"), get_model_object, add_patches / get_key_patches / model_state_dict, model_dtype, load_device.
Wrapping a network of a pack's own in a ModelPatcher (the constructor) and ComfyUI's hook/wrapper registries
(patcher_extension callbacks) are not provided.
"""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute, stand_in_type
from comfy_serverless.models.diffusion_model import DiffusionModel

ModelPatcher = stand_in_type("comfy.model_patcher.ModelPatcher", DiffusionModel)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
