"""ComfyUI's `comfy.sd1_clip` for custom node packs: the class names packs test `clip.cond_stage_model` and its
members with (isinstance), backed by comfy_serverless.models.clip_surface. Building one the ComfyUI way, the
tokenizer classes and the prompt-parsing helpers are not provided (placeholders)."""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute, stand_in_type
from comfy_serverless.models.clip_surface import ClipStage, SDClipEncoder

# ComfyUI's SDClipModel derives from ClipTokenWeightEncoder; SD2ClipModel and SDXLRefinerClipModel from
# SD1ClipModel (our SD2ClipStage and SDXLRefinerClipStage derive from ClipStage likewise).
ClipTokenWeightEncoder = stand_in_type("comfy.sd1_clip.ClipTokenWeightEncoder", SDClipEncoder)
SDClipModel = stand_in_type("comfy.sd1_clip.SDClipModel", SDClipEncoder)
SD1ClipModel = stand_in_type("comfy.sd1_clip.SD1ClipModel", ClipStage)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
