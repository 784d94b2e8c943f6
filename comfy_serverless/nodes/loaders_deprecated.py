"""DiffusersLoader (advanced/loaders/deprecated): an SD1.x / SD2.x / SDXL pipeline folder saved by diffusers,
from models/diffusers (models/diffusers_folders.py). Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

import os

from .. import paths


class DiffusersLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_path": (paths.current().diffusers_pipelines(),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "advanced/loaders/deprecated"
    DESCRIPTION = "Loads a diffusers pipeline folder (SD1.x, SD2.x, SDXL) from models/diffusers."

    def load_checkpoint(self, model_path, output_vae=True, output_clip=True):
        from ..models.diffusers_folders import MODEL_INDEX, load_pipeline

        folders = paths.current()
        for root in folders.model_dirs("diffusers"):
            folder = paths.safe_join(root, model_path)
            if folder and os.path.isfile(os.path.join(folder, MODEL_INDEX)):
                break
        else:
            raise FileNotFoundError(f"diffusers pipeline {model_path!r} not found: expected a folder with "
                                    f"{MODEL_INDEX} under models/diffusers")
        model, clip, vae = load_pipeline(folder)
        return model, clip if output_clip else None, vae if output_vae else None


NODE_CLASS_MAPPINGS = {"DiffusersLoader": DiffusersLoader}
# ComfyUI shows this node under its class name.
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
