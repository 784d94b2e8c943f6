"""unCLIPCheckpointLoader: an SD 2.1 unCLIP checkpoint (unclip-l / unclip-h) and the CLIP vision model inside it.

The MODEL turns unCLIPConditioning's image embeddings into its y input (models/unclip.py, models/extra_inputs.py).
Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

from .. import paths
from .loaders import model_file


class unCLIPCheckpointLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (paths.current().list_models("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads an SD 2.1 unCLIP checkpoint (unclip-l / unclip-h) and the CLIP vision model inside it; "
                   "CLIP_VISION is None for a checkpoint without one.")

    def load_checkpoint(self, ckpt_name, output_vae=True, output_clip=True):
        from ..models.loading import load_checkpoint, load_checkpoint_clip_vision

        path = model_file("checkpoints", ckpt_name)
        model, clip, vae = load_checkpoint(path, want_clip=output_clip, want_vae=output_vae)
        return model, clip, vae, load_checkpoint_clip_vision(path)


NODE_CLASS_MAPPINGS = {"unCLIPCheckpointLoader": unCLIPCheckpointLoader}
# ComfyUI shows this node under its class name.
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
