"""The extra UNet inputs a conditioning entry gives besides its text context (ComfyUI's "encode_adm" and
friends): SDXL's y from the pooled text and size conditioning.

extra_unet_inputs(model, options, latent_shape) is called once per conditioning entry and latent shape, with the
entry's options; it returns UNet keyword inputs (tensors batched per entry, repeated to the batch by the sampler).
"""

from __future__ import annotations

# SDXL's size conditioning: pixels per latent cell, used for ComfyUI's default original/target size.
LATENT_TO_PIXELS = 8
# Full SDXL: 1280 pooled + 6 * 256; other widths (test models) derive the size embedding from the pooled width.
SDXL_POOLED_WIDTH = {2816: 1280}


def extra_unet_inputs(model, options: dict, latent_shape) -> dict:
    """SDXL's y: sizes come from the conditioning options (CLIPTextEncodeSDXL's keys) or default to the latent
    size in pixels, crop 0."""
    if model.adm_channels is None:
        return {}
    import torch

    from ..networks.unet import sdxl_adm_vector

    adm_channels = model.adm_channels
    height = options.get("height", latent_shape[2] * LATENT_TO_PIXELS)
    width = options.get("width", latent_shape[3] * LATENT_TO_PIXELS)
    sizes = [height, width, options.get("crop_h", 0), options.get("crop_w", 0),
             options.get("target_height", height), options.get("target_width", width)]
    pooled = options.get("pooled_output")
    pooled_width = pooled.shape[-1] if pooled is not None else SDXL_POOLED_WIDTH.get(adm_channels, 0)
    pooled = torch.zeros(1, pooled_width) if pooled is None else pooled.float().reshape(-1, pooled_width)
    size_width = (adm_channels - pooled_width) // 6
    if pooled_width + 6 * size_width != adm_channels:
        raise ValueError(f"pooled output of width {pooled_width} does not fit this model's conditioning "
                         f"vector ({adm_channels}); was the text encoded with this model's CLIP?")
    size_conditioning = torch.tensor([sizes], dtype=torch.float32).expand(pooled.shape[0], -1)
    return {"y": sdxl_adm_vector(pooled, size_conditioning, size_width)}
