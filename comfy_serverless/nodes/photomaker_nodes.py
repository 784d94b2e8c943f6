"""PhotoMakerLoader / PhotoMakerEncode (ComfyUI's experimental PhotoMaker v1 nodes; models/photomaker.py).

Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

from .. import paths
from .loaders import model_file


class PhotoMakerLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"photomaker_model_name": (
            "COMBO", {"multiselect": False, "options": paths.current().list_models("photomaker")})}}

    RETURN_TYPES = ("PHOTOMAKER",)
    RETURN_NAMES = ("PHOTOMAKER",)
    FUNCTION = "load_photomaker_model"
    CATEGORY = "_for_testing/photomaker"
    EXPERIMENTAL = True
    DESCRIPTION = "Loads a PhotoMaker v1 ID encoder (photomaker-v1.bin) from models/photomaker."

    def load_photomaker_model(self, photomaker_model_name):
        from ..models.photomaker import load_photomaker

        return (load_photomaker(model_file("photomaker", photomaker_model_name)),)


class PhotoMakerEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "photomaker": ("PHOTOMAKER",),
            "image": ("IMAGE",),
            "clip": ("CLIP",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "photograph of photomaker"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    FUNCTION = "apply_photomaker"
    CATEGORY = "_for_testing/photomaker"
    EXPERIMENTAL = True
    DESCRIPTION = ("Encodes text with an SDXL CLIP and fuses the face of the first image into the word before the "
                   "trigger word 'photomaker' (which is dropped from the prompt).")

    def apply_photomaker(self, photomaker, image, clip, text):
        if photomaker is None or clip is None:
            raise RuntimeError("PhotoMakerEncode needs a PHOTOMAKER model and a CLIP; one input is None")
        return (photomaker.encode(image, clip, text),)


NODE_CLASS_MAPPINGS = {"PhotoMakerLoader": PhotoMakerLoader, "PhotoMakerEncode": PhotoMakerEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"PhotoMakerLoader": None, "PhotoMakerEncode": None}
