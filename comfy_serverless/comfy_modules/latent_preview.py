"""ComfyUI's `latent_preview` for custom node packs: the per-step callback samplers take (progress messages, plus
latent2rgb previews when --preview-method asks for them), over comfy_serverless/models/latent_preview.py.

TAESD previews need weights this server does not ship: asking for them gives latent2rgb, as the built-in
KSampler does.
"""

from __future__ import annotations

from comfy_serverless import settings
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.progress import ProgressBar

_FAMILIES = ("sd15", "sd2", "sdxl")


def __getattr__(name: str):
    if name == "MAX_PREVIEW_RESOLUTION":
        return settings.current().preview_size
    return missing_attribute(__name__, name)


def _method() -> str:
    from comfy.cli_args import args

    from comfy_serverless.models.latent_preview import preview_method

    method = args.preview_method
    return preview_method(str(getattr(method, "value", method)))


def preview_to_image(latent_image):
    """A PIL image of an [H, W, 3] preview in -1..1."""
    import numpy as np
    from PIL import Image

    pixels = ((latent_image.float() + 1.0) / 2.0).clamp(0, 1).mul(255).round()
    return Image.fromarray(pixels.to("cpu").numpy().astype(np.uint8))


class Latent2RGBPreviewer:
    """Previews a model-space latent with the family's fixed latent-to-RGB map."""

    def __init__(self, family: str = "sd15"):
        self.family = family if family in _FAMILIES else "sd15"

    def decode_latent_to_preview(self, x0):
        from comfy_serverless.models.latent_preview import preview_image

        return preview_image(x0, self.family)

    def decode_latent_to_preview_image(self, preview_format, x0):
        return preview_format, self.decode_latent_to_preview(x0), settings.current().preview_size


def set_preview_method(override: str | None = None) -> None:
    """Overrides --preview-method for what this module's callbacks send (this server only)."""
    from comfy.cli_args import LatentPreviewMethod, args

    if override and override != "default":
        args.preview_method = LatentPreviewMethod(override)


def get_previewer(device=None, latent_format=None):
    """A previewer for --preview-method, or None when previews are off. latent_format: a model family name
    ("sd15", "sd2", "sdxl") or anything with a `family`."""
    if _method() == "none":
        return None
    return Latent2RGBPreviewer(getattr(latent_format, "family", latent_format) or "sd15")


def prepare_callback(model, steps: int, x0_output_dict: dict | None = None):
    """callback(step, x0, x, total_steps) for samplers: a progress message per step, with a preview of x0 when
    previews are on; the last x0 is kept in x0_output_dict["x0"] when a dict is given."""
    previewer = get_previewer(latent_format=getattr(model, "family", None))
    bar = ProgressBar(steps)

    def callback(step, x0, x, total_steps):
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
        bar.update_absolute(step + 1, total_steps, preview)

    return callback
