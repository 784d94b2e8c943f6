"""SDXL text encoding nodes: CLIPTextEncodeSDXL and CLIPTextEncodeSDXLRefiner.

Both encode like CLIPTextEncode and add the numbers SDXL's UNets embed in their y vector to the conditioning
options (models/extra_inputs.py reads them): the base's original size, crop and target size, the refiner's
size and aesthetic score. Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

SIZE_MAX = 16384
TEXT = ("STRING", {"multiline": True, "dynamicPrompts": True})


def _size(default: int = 1024):
    return ("INT", {"default": default, "min": 0, "max": SIZE_MAX})


class CLIPTextEncodeSDXL:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "width": _size(),
            "height": _size(),
            "crop_w": _size(0),
            "crop_h": _size(0),
            "target_width": _size(),
            "target_height": _size(),
            "text_g": TEXT,
            "text_l": TEXT,
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = ("Encodes two prompts for SDXL base: text_g for the OpenCLIP bigG encoder, text_l for CLIP-L, "
                   "with the size conditioning SDXL was trained with.")

    def encode(self, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
        if clip is None:
            raise RuntimeError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                               "checkpoint has no text encoder.")
        empty = clip.tokenize("")
        if not {"g", "l"} <= set(empty):
            raise ValueError(f"CLIPTextEncodeSDXL needs an SDXL base CLIP (CLIP-L and bigG); this CLIP has the "
                             f"encoders {sorted(empty)}: use CLIPTextEncode (or CLIPTextEncodeSDXLRefiner for the "
                             f"refiner's CLIP)")
        tokens = clip.tokenize(text_g)
        tokens["l"] = clip.tokenize(text_l)["l"]
        # Both encoders must see the same number of 77-token windows: the shorter gets empty ones.
        while len(tokens["l"]) < len(tokens["g"]):
            tokens["l"] = tokens["l"] + empty["l"]
        while len(tokens["g"]) < len(tokens["l"]):
            tokens["g"] = tokens["g"] + empty["g"]
        sizes = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                 "target_width": target_width, "target_height": target_height}
        return (clip.encode_from_tokens_scheduled(tokens, add_dict=sizes),)


class CLIPTextEncodeSDXLRefiner:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ascore": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}),
            "width": _size(),
            "height": _size(),
            "text": TEXT,
            "clip": ("CLIP",),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = ("Encodes a prompt for the SDXL refiner with its aesthetic score (trained on 6 for good images, "
                   "2.5 is usual for negative prompts) and image size.")

    def encode(self, ascore, width, height, text, clip):
        if clip is None:
            raise RuntimeError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                               "checkpoint has no text encoder.")
        tokens = clip.tokenize(text)
        return (clip.encode_from_tokens_scheduled(
            tokens, add_dict={"aesthetic_score": ascore, "width": width, "height": height}),)


NODE_CLASS_MAPPINGS = {
    "CLIPTextEncodeSDXL": CLIPTextEncodeSDXL,
    "CLIPTextEncodeSDXLRefiner": CLIPTextEncodeSDXLRefiner,
}

# ComfyUI 0.3.64 reports no display name for either.
NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPTextEncodeSDXL": None,
    "CLIPTextEncodeSDXLRefiner": None,
}
