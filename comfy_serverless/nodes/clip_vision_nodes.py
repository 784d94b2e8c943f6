"""CLIP vision, style models and unCLIP conditioning.

CLIPVisionLoader / CLIPVisionEncode give ComfyUI's CLIP_VISION_OUTPUT (models/clip_vision.py);
StyleModelApply appends a T2I-Adapter style model's tokens to each conditioning entry's text context;
unCLIPConditioning adds {clip_vision_output, strength, noise_augmentation} to the entries'
"unclip_conditioning" list, which an unCLIP model turns into its y input (models/unclip.py).
unCLIPCheckpointLoader is in nodes/unclip_loader.py (it loads checkpoints, not CLIP vision files).

Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

from .. import paths
from .loaders import model_file


class CLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (paths.current().list_models("clip_vision"),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load_clip"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a CLIP vision model (ViT-L/14, ViT-L/14-336, ViT-H/14 or ViT-bigG/14) from models/clip_vision."

    def load_clip(self, clip_name):
        from ..models.clip_vision import load_clip_vision

        return (load_clip_vision(model_file("clip_vision", clip_name)),)


class CLIPVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION",),
            "image": ("IMAGE",),
            "crop": (["center", "none"],),
        }}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes images with a CLIP vision model: centre-cropped to a square, or squashed to one with "
                   "crop 'none'.")

    def encode(self, clip_vision, image, crop):
        if clip_vision is None:
            raise RuntimeError("clip_vision input is invalid: None. If it comes from a checkpoint loader, the "
                               "checkpoint has no CLIP vision model.")
        return (clip_vision.encode_image(image, crop=crop == "center"),)


class StyleModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"style_model_name": (paths.current().list_models("style_models"),)}}

    RETURN_TYPES = ("STYLE_MODEL",)
    FUNCTION = "load_style_model"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a T2I-Adapter style model from models/style_models."

    def load_style_model(self, style_model_name):
        from ..models.clip_vision import load_style_model

        return (load_style_model(model_file("style_models", style_model_name)),)


def _attention_bias_mask(txt, options: dict, added: int, strength: float, strength_type: str):
    """ComfyUI's attention_mask for the grown context: the old mask kept in its four quadrants around the new
    tokens, and log(strength) (attn_bias) or 0 as the bias towards them. float16, as ComfyUI makes it."""
    import torch

    bias = torch.log(torch.tensor([strength if strength_type == "attn_bias" else 1.0]))
    ref_shape = options.get("attention_mask_img_shape", (1, 1))
    n_ref = ref_shape[0] * ref_shape[1]
    n_txt = txt.shape[1]
    mask = options.get("attention_mask")
    if mask is None:
        mask = torch.zeros((txt.shape[0], n_txt + n_ref, n_txt + n_ref), dtype=torch.float16)
    if mask.dtype == torch.bool:
        mask = torch.log(mask.to(dtype=torch.float16))  # True -> 0, False -> -inf
    size = n_txt + added + n_ref
    grown = torch.zeros((txt.shape[0], size, size), dtype=torch.float16)
    old, new = slice(None, n_txt), slice(n_txt + added, None)
    grown[:, old, old] = mask[:, :n_txt, :n_txt]
    grown[:, old, new] = mask[:, :n_txt, n_txt:]
    grown[:, new, old] = mask[:, n_txt:, :n_txt]
    grown[:, new, new] = mask[:, n_txt:, n_txt:]
    grown[:, old, n_txt:n_txt + added] = bias
    grown[:, new, n_txt:n_txt + added] = bias
    return grown, ref_shape


class StyleModelApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "style_model": ("STYLE_MODEL",),
            "clip_vision_output": ("CLIP_VISION_OUTPUT",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}),
            "strength_type": (["multiply", "attn_bias"],),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_stylemodel"
    CATEGORY = "conditioning/style_model"
    DESCRIPTION = ("Appends a style model's tokens (from a CLIP vision encoding) to the prompt's tokens; "
                   "'multiply' scales them by strength, 'attn_bias' sets an attention bias of log(strength).")

    def apply_stylemodel(self, conditioning, style_model, clip_vision_output, strength, strength_type):
        import torch

        # All images' tokens side by side, one sequence for every entry (as ComfyUI).
        tokens = style_model.get_cond(clip_vision_output).flatten(start_dim=0, end_dim=1).unsqueeze(0)
        if strength_type == "multiply":
            tokens = tokens * strength
        added = tokens.shape[1]
        out = []
        for txt, options in conditioning:
            if tokens.shape[-1] != txt.shape[-1]:
                raise ValueError(f"the style model makes tokens {tokens.shape[-1]} wide but the conditioning's "
                                 f"are {txt.shape[-1]}: use a style model made for this model's text encoder")
            options = dict(options)
            # Even at strength 1 an existing mask must grow with the context.
            if "attention_mask" in options or (strength_type == "attn_bias" and strength != 1.0):
                options["attention_mask"], options["attention_mask_img_shape"] = _attention_bias_mask(
                    txt, options, added, strength, strength_type)
            out.append([torch.cat([txt, tokens.to(txt.dtype).expand(txt.shape[0], -1, -1)], dim=1), options])
        return (out,)


class unCLIPConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "clip_vision_output": ("CLIP_VISION_OUTPUT",),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            "noise_augmentation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_adm"
    CATEGORY = "conditioning"
    DESCRIPTION = "Adds an image's CLIP vision embedding to the conditioning, for unCLIP models."

    def apply_adm(self, conditioning, clip_vision_output, strength, noise_augmentation):
        if strength == 0:
            return (conditioning,)
        added = {"clip_vision_output": clip_vision_output, "strength": strength,
                 "noise_augmentation": noise_augmentation}
        return ([[txt, {**options, "unclip_conditioning": list(options.get("unclip_conditioning") or []) + [added]}]
                 for txt, options in conditioning],)


NODE_CLASS_MAPPINGS = {
    "CLIPVisionLoader": CLIPVisionLoader,
    "CLIPVisionEncode": CLIPVisionEncode,
    "StyleModelLoader": StyleModelLoader,
    "StyleModelApply": StyleModelApply,
    "unCLIPConditioning": unCLIPConditioning,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPVisionLoader": "Load CLIP Vision",
    "CLIPVisionEncode": "CLIP Vision Encode",
    "StyleModelLoader": "Load Style Model",
    "StyleModelApply": "Apply Style Model",
}
