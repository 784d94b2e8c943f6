"""VAE nodes: decode latents to images and encode images (whole, tiled, or for inpainting).

Standard library only at module level (torch is imported where it is used).
"""

from __future__ import annotations

import math


def resize_mask_to(mask, height: int, width: int):
    """MASK [B, H, W] (or [H, W]) -> [B, 1, height, width], bilinear."""
    import torch.nn.functional as F

    mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float()
    return F.interpolate(mask, size=(height, width), mode="bilinear")


def crop_with_mask(vae, pixels, mask):
    """Pixels cropped like the VAE crops them, and the mask resized to the pixels then cropped the same way."""
    mask = resize_mask_to(mask, pixels.shape[1], pixels.shape[2])
    cropped = vae.crop_to_multiple(pixels)
    mask = vae.crop_to_multiple(mask.movedim(1, -1)).movedim(-1, 1)
    return cropped, mask


def neutralize_masked_pixels(pixels, mask):
    """Masked pixels (mask >= 0.5) set to grey, so the encoded latent carries nothing of what is replaced."""
    keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)
    return (pixels[..., :3] - 0.5) * keep + 0.5


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode."}),
            "vae": ("VAE", {"tooltip": "The VAE that turns latents into pixels."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latents into images."

    def decode(self, vae, samples):
        return (vae.decode(samples["samples"]),)


class VAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "vae": ("VAE",),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                      "tooltip": "Only for video VAEs (unused here)."}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                         "tooltip": "Only for video VAEs (unused here)."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "_for_testing"

    def decode(self, vae, samples, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
        if tile_size < overlap * 4:  # as ComfyUI: an overlap above a quarter of the tile is cut down
            overlap = tile_size // 4
        compression = vae.spacial_compression_decode()
        return (vae.decode_tiled(samples["samples"], tile_x=tile_size // compression,
                                 tile_y=tile_size // compression, overlap=overlap // compression),)


class VAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels)},)


class VAEEncodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE",),
            "vae": ("VAE",),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                      "tooltip": "Only for video VAEs (unused here)."}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                         "tooltip": "Only for video VAEs (unused here)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing"

    def encode(self, vae, pixels, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        return ({"samples": vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap)},)


class VAEEncodeForInpaint:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE",),
            "vae": ("VAE",),
            "mask": ("MASK",),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent/inpaint"

    def encode(self, vae, pixels, mask, grow_mask_by=6):
        import torch
        import torch.nn.functional as F

        pixels, mask = crop_with_mask(vae, pixels, mask)
        noise_mask = mask.round()
        if grow_mask_by > 0:
            # Grow the noise mask a little so the regenerated area blends in at latent resolution.
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            padding = math.ceil((grow_mask_by - 1) / 2)
            grown = F.conv2d(noise_mask, kernel, padding=padding).clamp(0, 1)
            noise_mask = grown[:, :, :mask.shape[2], :mask.shape[3]].round()
        latent = vae.encode(neutralize_masked_pixels(pixels, mask))
        return ({"samples": latent, "noise_mask": noise_mask},)


NODE_CLASS_MAPPINGS = {
    "VAEDecode": VAEDecode,
    "VAEDecodeTiled": VAEDecodeTiled,
    "VAEEncode": VAEEncode,
    "VAEEncodeTiled": VAEEncodeTiled,
    "VAEEncodeForInpaint": VAEEncodeForInpaint,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VAEDecode": "VAE Decode",
    "VAEDecodeTiled": "VAE Decode (Tiled)",
    "VAEEncode": "VAE Encode",
    "VAEEncodeTiled": "VAE Encode (Tiled)",
    "VAEEncodeForInpaint": "VAE Encode (for Inpainting)",
}
