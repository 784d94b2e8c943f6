"""latent2rgb: a fixed linear map from the 4 latent channels to RGB, for cheap per-step previews.

Both fits are published ones, applied to latents in the UNet's (scaled) space:
  SD 1.x / 2.x  keturn, "Decoding latents to RGB without upscaling" (Hugging Face forum, 2022), fitted on
                SD 1.4 outputs; output in -1..1.
  SDXL          Timothy Alexis Vass, "Explaining the SDXL latent space" (Hugging Face blog, 2023);
                output in 0..255 (we divide by 255).
They are approximations (undersaturated); the real VAE decode is two thousand times slower.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# rows: latent channels 1-4; columns: R, G, B
SD1_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SD1_BIAS = (0.0, 0.0, 0.0)
SD1_RANGE = (-1.0, 1.0)
SDXL_FACTORS = ((60, 60, 60), (-60, -5, 10), (25, 15, -5), (-70, -50, -35))
SDXL_BIAS = (150, 140, 130)
SDXL_RANGE = (0.0, 255.0)

_taesd_logged = False


def preview_method(requested: str) -> str:
    """The method --preview-method gets here: "none", or "latent2rgb" for every other choice (auto picks it,
    and taesd falls back to it: logged once per process)."""
    global _taesd_logged
    if requested == "none":
        return "none"
    if requested == "taesd" and not _taesd_logged:
        _taesd_logged = True
        log.warning("--preview-method taesd: taesd needs weights this server does not ship; using latent2rgb")
    return "latent2rgb"


def latent_to_rgb(latent, family: str):
    """[4, h, w] latent in model space -> [h, w, 3] float in 0..1."""
    import torch

    if family == "sdxl":
        factors, bias, (low, high) = SDXL_FACTORS, SDXL_BIAS, SDXL_RANGE
    else:
        factors, bias, (low, high) = SD1_FACTORS, SD1_BIAS, SD1_RANGE
    weights = torch.tensor(factors, dtype=torch.float32)
    rgb = latent.float().permute(1, 2, 0) @ weights + torch.tensor(bias, dtype=torch.float32)
    return ((rgb - low) / (high - low)).clamp(0.0, 1.0)


def preview_image(latent, family: str):
    """A PIL image of the first item of a [B, 4, h, w] model-space latent."""
    import numpy as np
    from PIL import Image

    rgb = latent_to_rgb(latent[0], family)
    return Image.fromarray((rgb.numpy() * 255.0).round().astype(np.uint8), "RGB")
