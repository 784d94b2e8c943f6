"""More loaders: HypernetworkLoader (A1111 hypernetworks from models/hypernetworks, applied to the attention
inputs). Standard library only at module level."""

from __future__ import annotations

from .. import paths
from .loaders import model_file


class HypernetworkLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "hypernetwork_name": (paths.current().list_models("hypernetworks"),),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_hypernetwork"
    CATEGORY = "loaders"

    def load_hypernetwork(self, model, hypernetwork_name, strength):
        from ..models.hypernetwork import load_hypernetwork

        patch = load_hypernetwork(model_file("hypernetworks", hypernetwork_name), strength)
        patched = model.clone()
        patched.set_model_attn1_patch(patch)
        patched.set_model_attn2_patch(patch)
        return (patched,)


NODE_CLASS_MAPPINGS = {"HypernetworkLoader": HypernetworkLoader}
