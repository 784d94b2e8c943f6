"""Upscale models: UpscaleModelLoader and ImageUpscaleWithModel.

ComfyUI declares both as V3 nodes, so the file combo is a "COMBO" input whose options are the files of
models/upscale_models (like ComfyUI, validation does not check the name against the list; a missing file fails
when the loader runs). Standard library only at module level (see nodes/__init__.py)."""

from __future__ import annotations

from .. import paths


class UpscaleModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": ("COMBO", {"multiselect": False,
                                     "options": paths.current().list_models("upscale_models")}),
        }}

    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load_model"
    CATEGORY = "loaders"

    def load_model(self, model_name):
        from ..models.upscale_models import load_upscale_model

        path = paths.current().model_path("upscale_models", model_name)
        if path is None:
            raise FileNotFoundError(f"{model_name!r} not found in models/upscale_models")
        return (load_upscale_model(path),)


class ImageUpscaleWithModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, upscale_model, image):
        from .. import progress
        from ..models.upscale_models import upscale_image

        def per_tile(total):
            bar = progress.ProgressBar(total)
            return lambda: bar.update(1)

        return (upscale_image(upscale_model, image, progress=per_tile),)


NODE_CLASS_MAPPINGS = {
    "UpscaleModelLoader": UpscaleModelLoader,
    "ImageUpscaleWithModel": ImageUpscaleWithModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UpscaleModelLoader": "Load Upscale Model",
    "ImageUpscaleWithModel": "Upscale Image (using Model)",
}
