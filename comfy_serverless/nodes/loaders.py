"""Loader nodes: checkpoints, VAEs and LoRAs from the model folders.

Combos list the folders at request time (paths.FileList). Loading reads only headers and shapes here; the
networks are built on first use and kept in the loaded-model cache (models.model_cache). Standard library
only at module level.
"""

from __future__ import annotations

import logging

from .. import paths

log = logging.getLogger(__name__)


def model_file(folder: str, name: str) -> str:
    path = paths.current().model_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{name!r} not found in models/{folder}")
    return path


class CheckpointLoaderSimple:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (paths.current().list_models("checkpoints"),
                          {"tooltip": "A checkpoint file in models/checkpoints."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The diffusion model, which denoises latents.",
                       "The text encoder, which turns prompts into conditioning.",
                       "The VAE, which converts between images and latents.")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a Stable Diffusion checkpoint (SD1.x, SD2.x or SDXL, single-file layout)."

    def load_checkpoint(self, ckpt_name):
        from ..models.loading import load_checkpoint

        return load_checkpoint(model_file("checkpoints", ckpt_name))


class CheckpointLoader:
    """Deprecated in ComfyUI: the config file is not needed, the architecture is read from the weights."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "config_name": (paths.current().list_models("configs"),),
            "ckpt_name": (paths.current().list_models("checkpoints"),),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "advanced/loaders"
    DEPRECATED = True

    def load_checkpoint(self, config_name, ckpt_name):
        from ..models.loading import load_checkpoint

        log.info("CheckpointLoader: ignoring config %s (the architecture is detected from the weights)",
                 config_name)
        return load_checkpoint(model_file("checkpoints", ckpt_name))


class VAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (paths.current().list_models("vae"),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"

    def load_vae(self, vae_name):
        from ..models.loading import load_vae

        return (load_vae(model_file("vae", vae_name)),)


class LoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder to apply the LoRA to."}),
            "lora_name": (paths.current().list_models("loras"), {"tooltip": "A LoRA file in models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to change the diffusion model (may be negative)."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to change the text encoder (may be negative)."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA.", "The text encoder with the LoRA.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = "Applies a LoRA to the diffusion model and text encoder. LoRA nodes can be chained."

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        from ..models.loading import apply_lora_file

        return apply_lora_file(model_file("loras", lora_name), model, clip, strength_model, strength_clip)


class LoraLoaderModelOnly(LoraLoader):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (paths.current().list_models("loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA.",)
    FUNCTION = "load_lora_model_only"
    DESCRIPTION = "Applies a LoRA to the diffusion model only. LoRA nodes can be chained."

    def load_lora_model_only(self, model, lora_name, strength_model):
        return (self.load_lora(model, None, lora_name, strength_model, 0)[0],)


NODE_CLASS_MAPPINGS = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "CheckpointLoader": CheckpointLoader,
    "VAELoader": VAELoader,
    "LoraLoader": LoraLoader,
    "LoraLoaderModelOnly": LoraLoaderModelOnly,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CheckpointLoader": "Load Checkpoint With Config (DEPRECATED)",
    "VAELoader": "Load VAE",
    "LoraLoader": "Load LoRA",
}
