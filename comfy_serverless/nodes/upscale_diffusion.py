"""SD_4XUpscale_Conditioning: the SD x4 upscaler's inputs (ComfyUI's comfy_extras.nodes_sdupscale).

The low-res image, in [-1, 1] and resized to the latent's size, rides on both conditionings as "concat_image"
with the "noise_augmentation" amount; the model (models/extra_inputs.py) turns them into its extra channels and
noise-level label. The empty latent is scale_ratio times the image, in the upscaler's 4x latent cells.
Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

# The x4 upscaler's VAE works in 4x4 pixel cells.
X4_LATENT_CELL = 4


class SD_4XUpscale_Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "scale_ratio": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "noise_augmentation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = "conditioning/upscale_diffusion"

    def encode(self, images, positive, negative, scale_ratio, noise_augmentation):
        import torch
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images must be an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")
        width = max(1, round(images.shape[-2] * scale_ratio))
        height = max(1, round(images.shape[-3] * scale_ratio))
        latent_height, latent_width = height // X4_LATENT_CELL, width // X4_LATENT_CELL
        if latent_height < 1 or latent_width < 1:
            raise ValueError(f"scale_ratio {scale_ratio} makes a {width}x{height} image, smaller than one "
                             f"{X4_LATENT_CELL}x{X4_LATENT_CELL} latent cell of the x4 upscaler")
        pixels = images[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
        pixels = F.interpolate(pixels, size=(latent_height, latent_width), mode="bilinear", align_corners=False)

        def with_image(conditioning):
            return [[context, {**options, "concat_image": pixels, "noise_augmentation": noise_augmentation}]
                    for context, options in conditioning]

        latent = torch.zeros(images.shape[0], 4, latent_height, latent_width)
        return with_image(positive), with_image(negative), {"samples": latent}


NODE_CLASS_MAPPINGS = {"SD_4XUpscale_Conditioning": SD_4XUpscale_Conditioning}
# ComfyUI gives this node no display name (null in its /object_info).
NODE_DISPLAY_NAME_MAPPINGS = {"SD_4XUpscale_Conditioning": None}
