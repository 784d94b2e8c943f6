"""GLIGEN nodes: GLIGENLoader (models/gligen) and GLIGENTextBoxApply (a text placed in a box, as grounding for
the conditioning's entries); and CLIPTextEncodeControlnet (a separate text for ControlNets). Standard library only
at module level."""

from __future__ import annotations

from .. import paths
from .loaders import model_file

POSITION = {"default": 0, "min": 0, "max": 16384, "step": 8}
SIZE = {"default": 64, "min": 8, "max": 16384, "step": 8}


class GLIGENLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gligen_name": (paths.current().list_models("gligen"),)}}

    RETURN_TYPES = ("GLIGEN",)
    FUNCTION = "load_gligen"
    CATEGORY = "loaders"

    def load_gligen(self, gligen_name):
        from ..models.gligen import load_gligen

        return (load_gligen(model_file("gligen", gligen_name)),)


class GLIGENTextBoxApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning_to": ("CONDITIONING",),
            "clip": ("CLIP",),
            "gligen_textbox_model": ("GLIGEN",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "width": ("INT", SIZE),
            "height": ("INT", SIZE),
            "x": ("INT", POSITION),
            "y": ("INT", POSITION),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning/gligen"

    def append(self, conditioning_to, clip, gligen_textbox_model, text, width, height, x, y):
        if getattr(clip, "family", "sd15") != "sd15":
            raise ValueError("GLIGENTextBoxApply needs the unprojected pooled text output, which this server gives "
                             f"for SD 1.x text encoders only (this CLIP is {clip.family})")
        # SD 1.x's pooled output has no projection, so it is the unprojected one GLIGEN was trained on.
        _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        box = (pooled, height // 8, width // 8, y // 8, x // 8)  # latent pixels, as ComfyUI stores them
        out = []
        for context, options in conditioning_to:
            options = dict(options)
            earlier = list(options["gligen"][2]) if "gligen" in options else []
            options["gligen"] = ("position", gligen_textbox_model, earlier + [box])
            out.append([context, options])
        return (out,)


class CLIPTextEncodeControlnet:
    """Sets "cross_attn_controlnet" / "pooled_output_controlnet" on every entry: ComfyUI's ControlNets read these
    instead of the prompt's own conditioning."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "conditioning": ("CONDITIONING",),
                             "text": ("STRING", {"multiline": True, "dynamicPrompts": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing/conditioning"
    EXPERIMENTAL = True

    def encode(self, clip, conditioning, text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return ([[context, {**options, "cross_attn_controlnet": cond, "pooled_output_controlnet": pooled}]
                 for context, options in conditioning],)


NODE_CLASS_MAPPINGS = {
    "GLIGENLoader": GLIGENLoader,
    "GLIGENTextBoxApply": GLIGENTextBoxApply,
    "CLIPTextEncodeControlnet": CLIPTextEncodeControlnet,
}
NODE_DISPLAY_NAME_MAPPINGS = {"CLIPTextEncodeControlnet": None}
