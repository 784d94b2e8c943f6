"""ComfyUI's `comfy.clip_vision` for custom node packs: CLIP vision files loaded by this server's loader.

`load(path)` returns the same CLIP_VISION object as the CLIPVisionLoader node (comfy_serverless.models.
clip_vision.CLIPVision, which isinstance(..., ClipVisionModel) accepts); its `encode_image(image, crop=True)`
returns an `Output` with last_hidden_state, image_embeds, penultimate_hidden_states, image_sizes and
mm_projected (None). `clip_preprocess` is ComfyUI's image preparation. Building a model from a state dict
(load_clipvision_from_sd) is not provided.
"""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute, stand_in_type
from comfy_serverless.models.clip_vision import CLIPVision, Output, clip_preprocess  # noqa: F401  (ComfyUI names)

ClipVisionModel = stand_in_type("comfy.clip_vision.ClipVisionModel", CLIPVision)


def load(ckpt_path):
    """A CLIP vision model file (transformers' or OpenCLIP's layout), as CLIPVisionLoader loads it."""
    from comfy_serverless.models.clip_vision import load_clip_vision

    return load_clip_vision(str(ckpt_path))


def __getattr__(name: str):
    return missing_attribute(__name__, name)
