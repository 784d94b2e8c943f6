"""A pack that imports ComfyUI internals comfy-serverless does not have, as many real packs do at import time."""

import comfy.model_base
import comfy.model_management
from comfy.ldm.modules.attention import optimized_attention
from comfy.utils import something_this_server_lacks


class PatchedModel(comfy.model_base.BaseModel):
    """Packs subclass ComfyUI's model classes at import time."""

    def extra_conds(self, **kwargs):
        return {}


def attention(q, k, v, heads, implementation=optimized_attention):
    return implementation(q, k, v, heads)


FALLBACKS = {"helper": something_this_server_lacks}  # kept for later, as packs keep such references


class StillWorks:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def run(self, value):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return {"ui": {"value": [value + 1]}, "result": (value + 1,)}


class NeedsAttention:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "comfy_style"

    def run(self, value):
        return (attention(value, value, value, 1),)


class NeedsBaseModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "comfy_style"

    def run(self, value):
        PatchedModel(None)
        return (value,)


NODE_CLASS_MAPPINGS = {"StillWorks": StillWorks, "NeedsAttention": NeedsAttention, "NeedsBaseModel": NeedsBaseModel}
