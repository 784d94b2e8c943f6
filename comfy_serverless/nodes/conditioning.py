"""Conditioning nodes: text encoding and the edits ComfyUI offers on CONDITIONING lists.

CONDITIONING is a list of [cond tensor [1, tokens, width], options dict]; CLIPTextEncode puts the pooled
output in options["pooled_output"], the other nodes add area / mask / strength / timestep-range options
that the sampler reads. Standard library only at module level (torch is imported where it is used).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MAX_RESOLUTION = 16384


def with_options(conditioning, values: dict) -> list:
    """A copy of every entry with `values` merged into its options (tensors are shared, not copied)."""
    return [[cond, {**options, **values}] for cond, options in conditioning]


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt to encode."}),
            "clip": ("CLIP", {"tooltip": "The text encoder, usually from a checkpoint loader."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The encoded prompt, to guide the sampler.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = "Turns a text prompt into conditioning for the diffusion model, using a CLIP text encoder."

    def encode(self, clip, text):
        if clip is None:
            raise RuntimeError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                               "checkpoint has no text encoder.")
        # As ComfyUI: scheduled encoding, so a CLIP with hooks (SetClipHooks) encodes per keyframe range.
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


class CLIPSetLastLayer:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1}),
        }}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"

    def set_last_layer(self, clip, stop_at_clip_layer):
        return (clip.set_last_layer(stop_at_clip_layer),)


class ConditioningCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = "conditioning"

    def combine(self, conditioning_1, conditioning_2):
        return (conditioning_1 + conditioning_2,)


class ConditioningAverage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning_to": ("CONDITIONING",),
            "conditioning_from": ("CONDITIONING",),
            "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "addWeighted"
    CATEGORY = "conditioning"

    def addWeighted(self, conditioning_to, conditioning_from, conditioning_to_strength):
        import torch

        if len(conditioning_from) > 1:
            log.warning("ConditioningAverage: conditioning_from has %d entries; only the first is used",
                        len(conditioning_from))
        source, source_options = conditioning_from[0]
        pooled_from = source_options.get("pooled_output")
        weight = conditioning_to_strength
        out = []
        for cond, options in conditioning_to:
            # The source is cut or zero-padded to the target's token count.
            other = source[:, :cond.shape[1]]
            if other.shape[1] < cond.shape[1]:
                padding = torch.zeros(1, cond.shape[1] - other.shape[1], cond.shape[2], dtype=other.dtype)
                other = torch.cat([other, padding], dim=1)
            merged = dict(options)
            pooled_to = options.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                merged["pooled_output"] = pooled_to * weight + pooled_from * (1.0 - weight)
            elif pooled_from is not None:
                merged["pooled_output"] = pooled_from
            out.append([cond * weight + other * (1.0 - weight), merged])
        return (out,)


class ConditioningConcat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "concat"
    CATEGORY = "conditioning"

    def concat(self, conditioning_to, conditioning_from):
        import torch

        if len(conditioning_from) > 1:
            log.warning("ConditioningConcat: conditioning_from has %d entries; only the first is used",
                        len(conditioning_from))
        source = conditioning_from[0][0]
        return ([[torch.cat((cond, source), dim=1), dict(options)] for cond, options in conditioning_to],)


class ConditioningSetArea:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "width": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, width, height, x, y, strength):
        # Areas are stored in latent cells: (height, width, y, x).
        area = (height // 8, width // 8, y // 8, x // 8)
        return (with_options(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaPercentage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "width": ("FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}),
            "height": ("FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}),
            "x": ("FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}),
            "y": ("FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, width, height, x, y, strength):
        # Fractions of the latent, turned into cells by the sampler once it knows the latent's size.
        area = ("percentage", height, width, y, x)
        return (with_options(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, strength):
        return (with_options(conditioning, {"strength": strength}),)


class ConditioningSetMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "mask": ("MASK",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "set_cond_area": (["default", "mask bounds"],),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning, mask, set_cond_area, strength):
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        values = {"mask": mask, "set_area_to_bounds": set_cond_area != "default", "mask_strength": strength}
        return (with_options(conditioning, values),)


class ConditioningZeroOut:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"

    def zero_out(self, conditioning):
        import torch

        out = []
        for cond, options in conditioning:
            options = dict(options)
            if options.get("pooled_output") is not None:
                options["pooled_output"] = torch.zeros_like(options["pooled_output"])
            out.append([torch.zeros_like(cond), options])
        return (out,)


class ConditioningSetTimestepRange:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_range"
    CATEGORY = "advanced/conditioning"

    def set_range(self, conditioning, start, end):
        return (with_options(conditioning, {"start_percent": start, "end_percent": end}),)


class InpaintModelConditioning:
    """Encodes the masked image for inpainting models (9-channel UNets, which checkpoint_files does not
    load yet) and returns the latent to sample. Ordinary models ignore the extra conditioning and use only
    the noise mask."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "vae": ("VAE",),
            "pixels": ("IMAGE",),
            "mask": ("MASK",),
            "noise_mask": ("BOOLEAN", {"default": True, "tooltip": "Also set the mask as the latent's noise "
                                       "mask, so sampling changes only the masked area."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = "conditioning/inpaint"

    def encode(self, positive, negative, pixels, vae, mask, noise_mask=True):
        from .vae_nodes import crop_with_mask, neutralize_masked_pixels

        cropped, mask = crop_with_mask(vae, pixels, mask)
        concat_latent = vae.encode(neutralize_masked_pixels(cropped, mask))
        latent = {"samples": vae.encode(pixels)}
        if noise_mask:
            latent["noise_mask"] = mask
        values = {"concat_latent_image": concat_latent, "concat_mask": mask}
        return (with_options(positive, values), with_options(negative, values), latent)


class InstructPixToPixConditioning:
    """InstructPix2Pix: the input picture, VAE-encoded, goes to both conditionings as the image the model sees
    beside the noise; the latent to sample is zeros of the same size. Pixels are first trimmed (evenly on both
    sides) to multiples of 8. Ordinary 4-channel models ignore the picture."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "vae": ("VAE",),
            "pixels": ("IMAGE",),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = "conditioning/instructpix2pix"

    def encode(self, positive, negative, pixels, vae):
        import torch

        height, width = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        if height == 0 or width == 0:
            raise ValueError(f"pixels of {pixels.shape[1]} x {pixels.shape[2]} are smaller than one latent cell "
                             "(8 x 8)")
        top, left = pixels.shape[1] % 8 // 2, pixels.shape[2] % 8 // 2
        concat_latent = vae.encode(pixels[:, top:top + height, left:left + width, :])
        values = {"concat_latent_image": concat_latent}
        latent = {"samples": torch.zeros_like(concat_latent)}
        return (with_options(positive, values), with_options(negative, values), latent)


NODE_CLASS_MAPPINGS = {
    "CLIPTextEncode": CLIPTextEncode,
    "CLIPSetLastLayer": CLIPSetLastLayer,
    "ConditioningCombine": ConditioningCombine,
    "ConditioningAverage": ConditioningAverage,
    "ConditioningConcat": ConditioningConcat,
    "ConditioningSetArea": ConditioningSetArea,
    "ConditioningSetAreaPercentage": ConditioningSetAreaPercentage,
    "ConditioningSetAreaStrength": ConditioningSetAreaStrength,
    "ConditioningSetMask": ConditioningSetMask,
    "ConditioningZeroOut": ConditioningZeroOut,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
    "InpaintModelConditioning": InpaintModelConditioning,
    "InstructPixToPixConditioning": InstructPixToPixConditioning,
}

# ComfyUI 0.3.64's names; ConditioningAverage has none there (its entry is misspelt with a trailing space),
# so it shows its class name, as here, like ConditioningSetAreaStrength. The V3 InstructPixToPixConditioning
# reports null.
NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
    "ConditioningCombine": "Conditioning (Combine)",
    "ConditioningConcat": "Conditioning (Concat)",
    "ConditioningSetArea": "Conditioning (Set Area)",
    "ConditioningSetAreaPercentage": "Conditioning (Set Area with Percentage)",
    "ConditioningSetMask": "Conditioning (Set Mask)",
    "InstructPixToPixConditioning": None,
}
