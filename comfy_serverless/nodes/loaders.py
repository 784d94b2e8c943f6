"""Loader nodes: checkpoints, VAEs, LoRAs, and UNets / text encoders on their own, from the model folders.

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


class UNETLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (paths.current().list_models("diffusion_models"),),
            "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = ("Loads a diffusion model file holding only a UNet (SD1.x, SD2.x, SDXL base or refiner; original "
                   "or diffusers names). Only the default weight dtype is supported.")

    def load_unet(self, unet_name, weight_dtype):
        from ..models.loading import load_unet

        return (load_unet(model_file("diffusion_models", unet_name), weight_dtype),)


# ComfyUI's CLIPLoader / DualCLIPLoader types; this server builds the Stable Diffusion ones only.
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]


def _supported_type(clip_type: str, supported: str) -> None:
    if clip_type != supported:
        raise ValueError(f"CLIP type {clip_type!r} is not supported by this server (its models are not built "
                         f"here); use {supported!r}")


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (paths.current().list_models("text_encoders"),),
                "type": (list(CLIP_TYPES),),
            },
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = ("Loads a text encoder file. stable_diffusion: CLIP-L (SD1.x), OpenCLIP ViT-H (SD2.x) or "
                   "OpenCLIP ViT-bigG alone (the SDXL refiner).")

    def load_clip(self, clip_name, type="stable_diffusion", device="default"):
        from ..models.loading import load_text_encoders

        _supported_type(type, "stable_diffusion")
        return (load_text_encoders([model_file("text_encoders", clip_name)], type),)


class DualCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name1": (paths.current().list_models("text_encoders"),),
                "clip_name2": (paths.current().list_models("text_encoders"),),
                "type": (list(DUAL_CLIP_TYPES),),
            },
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = "Loads two text encoder files. sdxl: CLIP-L and OpenCLIP ViT-bigG, in either order."

    def load_clip(self, clip_name1, clip_name2, type, device="default"):
        from ..models.loading import load_text_encoders

        _supported_type(type, "sdxl")
        files = [model_file("text_encoders", clip_name1), model_file("text_encoders", clip_name2)]
        return (load_text_encoders(files, type),)


NODE_CLASS_MAPPINGS = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "CheckpointLoader": CheckpointLoader,
    "VAELoader": VAELoader,
    "LoraLoader": LoraLoader,
    "LoraLoaderModelOnly": LoraLoaderModelOnly,
    "UNETLoader": UNETLoader,
    "CLIPLoader": CLIPLoader,
    "DualCLIPLoader": DualCLIPLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CheckpointLoader": "Load Checkpoint With Config (DEPRECATED)",
    "VAELoader": "Load VAE",
    "LoraLoader": "Load LoRA",
    "UNETLoader": "Load Diffusion Model",
    "CLIPLoader": "Load CLIP",
    "DualCLIPLoader": "DualCLIPLoader",
}
