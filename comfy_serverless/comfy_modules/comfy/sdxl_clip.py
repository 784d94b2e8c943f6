"""ComfyUI's `comfy.sdxl_clip` for custom node packs: isinstance names for an SDXL CLIP's cond_stage_model
(SDXLClipModel), the refiner's (SDXLRefinerClipModel) and the bigG member (SDXLClipG), backed by
comfy_serverless.models.clip_surface. Building one the ComfyUI way and the tokenizers are not provided."""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute, stand_in_type
from comfy_serverless.models.clip_surface import SDXLClipGEncoder, SDXLClipStage, SDXLRefinerClipStage

SDXLClipModel = stand_in_type("comfy.sdxl_clip.SDXLClipModel", SDXLClipStage)
SDXLRefinerClipModel = stand_in_type("comfy.sdxl_clip.SDXLRefinerClipModel", SDXLRefinerClipStage)
SDXLClipG = stand_in_type("comfy.sdxl_clip.SDXLClipG", SDXLClipGEncoder)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
