"""Nodes that patch how a MODEL samples: model sampling, guidance rescaling, FreeU, attention guidance, tiling.

Each node clones the MODEL and installs ComfyUI-style patches through its ModelPatcher methods
(models/patcher_api.py); the functions themselves live in models/model_patch_functions.py.
Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

DOWNSCALE_METHODS = ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]
SAMPLING_TYPES = ["eps", "v_prediction", "lcm", "x0", "img_to_img"]


def _float(default, minimum, maximum, step, **extra):
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra})


def _combo(options):
    return ("COMBO", {"multiselect": False, "options": list(options)})


class ModelSamplingDiscrete:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "sampling": (list(SAMPLING_TYPES),),
                             "zsnr": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, sampling, zsnr):
        from ..models.model_sampling_variants import discrete_model_sampling

        if sampling not in SAMPLING_TYPES:
            raise ValueError(f"ModelSamplingDiscrete: unknown sampling {sampling!r}; one of {SAMPLING_TYPES}")
        betas = getattr(model.get_model_object("model_sampling"), "betas", None)
        patched = model.clone()
        patched.add_object_patch("model_sampling", discrete_model_sampling(sampling, zsnr, betas))
        return (patched,)


class RescaleCFG:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "multiplier": _float(0.7, 0.0, 1.0, 0.01)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, multiplier):
        from ..models.model_patch_functions import rescale_cfg_function

        patched = model.clone()
        patched.set_model_sampler_cfg_function(rescale_cfg_function(multiplier))
        return (patched,)


class FreeU:
    VERSION = 1
    DEFAULTS = (1.1, 1.2, 0.9, 0.2)

    @classmethod
    def INPUT_TYPES(cls):
        b1, b2, s1, s2 = cls.DEFAULTS
        return {"required": {"model": ("MODEL",), "b1": _float(b1, 0.0, 10.0, 0.01), "b2": _float(b2, 0.0, 10.0, 0.01),
                             "s1": _float(s1, 0.0, 10.0, 0.01), "s2": _float(s2, 0.0, 10.0, 0.01)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    def patch(self, model, b1, b2, s1, s2):
        from ..models.model_patch_functions import freeu_output_patch

        channels = model.get_model_object("diffusion_model").config.model_channels
        patched = model.clone()
        patched.set_model_output_block_patch(freeu_output_patch(channels, b1, b2, s1, s2, self.VERSION))
        return (patched,)


class FreeU_V2(FreeU):
    VERSION = 2
    DEFAULTS = (1.3, 1.4, 0.9, 0.2)


class PerturbedAttentionGuidance:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": _float(3.0, 0.0, 100.0, 0.01, round=0.01)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    def patch(self, model, scale):
        from ..models.model_patch_functions import pag_post_cfg_function

        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(pag_post_cfg_function(scale))
        return (patched,)


class SelfAttentionGuidance:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": _float(0.5, -2.0, 5.0, 0.01),
                             "blur_sigma": _float(2.0, 0.0, 10.0, 0.1)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True

    def patch(self, model, scale, blur_sigma):
        from ..models.model_patch_functions import self_attention_guidance

        record, guide = self_attention_guidance(scale, blur_sigma)
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(guide, disable_cfg1_optimization=True)
        patched.set_model_attn1_replace(record, "middle", 0, 0)
        return (patched,)


class PatchModelAddDownscale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "block_number": ("INT", {"default": 3, "min": 1, "max": 32, "step": 1}),
            "downscale_factor": _float(2.0, 0.1, 9.0, 0.001),
            "start_percent": _float(0.0, 0.0, 1.0, 0.001),
            "end_percent": _float(0.35, 0.0, 1.0, 0.001),
            "downscale_after_skip": ("BOOLEAN", {"default": True}),
            "downscale_method": _combo(DOWNSCALE_METHODS),
            "upscale_method": _combo(DOWNSCALE_METHODS),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    def patch(self, model, block_number, downscale_factor, start_percent, end_percent, downscale_after_skip,
              downscale_method, upscale_method):
        from ..models.model_patch_functions import downscale_patches

        for method in (downscale_method, upscale_method):
            if method not in DOWNSCALE_METHODS:
                raise ValueError(f"PatchModelAddDownscale: unknown method {method!r}; one of {DOWNSCALE_METHODS}")
        sampling = model.get_model_object("model_sampling")
        shrink, grow = downscale_patches(block_number, downscale_factor, sampling.percent_to_sigma(start_percent),
                                         sampling.percent_to_sigma(end_percent), downscale_method, upscale_method)
        patched = model.clone()
        if downscale_after_skip:
            patched.set_model_input_block_patch_after_skip(shrink)
        else:
            patched.set_model_input_block_patch(shrink)
        patched.set_model_output_block_patch(grow)
        return (patched,)


class HyperTile:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tile_size": ("INT", {"default": 256, "min": 1, "max": 2048}),
                             "swap_size": ("INT", {"default": 2, "min": 1, "max": 128}),
                             "max_depth": ("INT", {"default": 0, "min": 0, "max": 10}),
                             "scale_depth": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    def patch(self, model, tile_size, swap_size, max_depth, scale_depth):
        from ..models.model_patch_functions import hypertile_patches

        tile, untile = hypertile_patches(tile_size, swap_size, max_depth, scale_depth)
        patched = model.clone()
        patched.set_model_attn1_patch(tile)
        patched.set_model_attn1_output_patch(untile)
        return (patched,)


class EpsilonScaling:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "scaling_factor": _float(1.005, 0.5, 1.5, 0.001, display="number")}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    def patch(self, model, scaling_factor):
        from ..models.model_patch_functions import epsilon_scaling_function

        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(epsilon_scaling_function(scaling_factor))
        return (patched,)


class CFGZeroStar:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "advanced/guidance"

    def patch(self, model):
        from ..models.model_patch_functions import cfg_zero_star_function

        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(cfg_zero_star_function())
        return (patched,)


class CFGNorm:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "strength": _float(1.0, 0.0, 100.0, 0.01)}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "advanced/guidance"
    EXPERIMENTAL = True

    def patch(self, model, strength):
        from ..models.model_patch_functions import cfg_norm_function

        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(cfg_norm_function(strength))
        return (patched,)


class PerpNeg:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "empty_conditioning": ("CONDITIONING",),
                             "neg_scale": _float(1.0, 0.0, 100.0, 0.01)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    DEPRECATED = True
    EXPERIMENTAL = True

    def patch(self, model, empty_conditioning, neg_scale):
        from ..models.model_patch_functions import perp_neg_cfg_function

        patched = model.clone()
        patched.set_model_sampler_cfg_function(perp_neg_cfg_function(empty_conditioning, neg_scale))
        return (patched,)


def _multipliers():
    return {name: _float(1.0, 0.0, 10.0, 0.01) for name in ("q", "k", "v", "out")}


def _scaled_copy(shape):
    """A patch value that is all zeros without the memory: with strength_patch 0 the weight is only scaled."""
    import torch

    return (torch.zeros((), dtype=torch.float32).expand(shape),)


# Projection names per attention kind, and which multiplier each gets.
_PROJECTIONS = {"unet": {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"},
                "clip": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                         "self_attn.out_proj": "out"}}


def _attention_scales(weights: dict, prefix_of, kind: str, factors: dict) -> dict:
    """{strength: {key: value}}: each projection weight/bias of the chosen attention scaled by its factor."""
    grouped: dict = {}
    for key, value in weights.items():
        for projection, factor in _PROJECTIONS[kind].items():
            if key.endswith((f"{prefix_of}{projection}.weight", f"{prefix_of}{projection}.bias")):
                grouped.setdefault(factors[factor], {})[key] = _scaled_copy(value.shape)
    return grouped


class UNetSelfAttentionMultiply:
    ATTENTION = "attn1"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), **_multipliers()}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing/attention_experiments"
    EXPERIMENTAL = True

    def patch(self, model, q, k, v, out):
        patched = model.clone()
        grouped = _attention_scales(model.model_state_dict(), f"{self.ATTENTION}.", "unet",
                                    {"q": q, "k": k, "v": v, "out": out})
        for strength, patches in grouped.items():
            patched.add_patches(patches, 0.0, strength)
        return (patched,)


class UNetCrossAttentionMultiply(UNetSelfAttentionMultiply):
    ATTENTION = "attn2"


class CLIPAttentionMultiply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), **_multipliers()}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing/attention_experiments"
    EXPERIMENTAL = True

    def patch(self, clip, q, k, v, out):
        from ..models import clip_patcher_api

        patched = clip.clone()
        grouped = _attention_scales(clip_patcher_api.model_state_dict(clip), "", "clip",
                                    {"q": q, "k": k, "v": v, "out": out})
        for strength, patches in grouped.items():
            clip_patcher_api.add_patches(patched, patches, 0.0, strength)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "ModelSamplingDiscrete": ModelSamplingDiscrete,
    "RescaleCFG": RescaleCFG,
    "FreeU": FreeU,
    "FreeU_V2": FreeU_V2,
    "PerturbedAttentionGuidance": PerturbedAttentionGuidance,
    "SelfAttentionGuidance": SelfAttentionGuidance,
    "PatchModelAddDownscale": PatchModelAddDownscale,
    "HyperTile": HyperTile,
    "Epsilon Scaling": EpsilonScaling,
    "CFGZeroStar": CFGZeroStar,
    "CFGNorm": CFGNorm,
    "PerpNeg": PerpNeg,
    "UNetSelfAttentionMultiply": UNetSelfAttentionMultiply,
    "UNetCrossAttentionMultiply": UNetCrossAttentionMultiply,
    "CLIPAttentionMultiply": CLIPAttentionMultiply,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "PerturbedAttentionGuidance": None,
    "SelfAttentionGuidance": "Self-Attention Guidance",
    "PatchModelAddDownscale": "PatchModelAddDownscale (Kohya Deep Shrink)",
    "HyperTile": None,
    "Epsilon Scaling": None,
    "CFGZeroStar": None,
    "CFGNorm": None,
    "PerpNeg": "Perp-Neg (DEPRECATED by PerpNegGuider)",
    "UNetSelfAttentionMultiply": None,
    "UNetCrossAttentionMultiply": None,
    "CLIPAttentionMultiply": None,
}
