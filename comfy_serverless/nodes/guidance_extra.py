"""More guidance and model-patch nodes: the Perp-Neg guider, ToMe token merging, Mahiro, TCFG, APG and FreSca.

Each patch node clones the MODEL and installs a ComfyUI-style function through its ModelPatcher methods
(models/patcher_api.py); the functions live in models/guidance_functions.py. Standard library only at module
level (see nodes/__init__.py).
"""

from __future__ import annotations


def _float(default, minimum, maximum, step, **extra):
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra})


def _check_range(node: str, name: str, value, minimum, maximum) -> None:
    """Nodes called directly (packs, tests) get the range check the prompt validator gives HTTP clients."""
    if not minimum <= value <= maximum:
        raise ValueError(f"{node}: {name} must be between {minimum} and {maximum}, got {value}")


class PerpNegGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "empty_conditioning": ("CONDITIONING",),
            "cfg": _float(8.0, 0.0, 100.0, 0.1, round=0.01),
            "neg_scale": _float(1.0, 0.0, 100.0, 0.01),
        }}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True

    def get_guider(self, model, positive, negative, empty_conditioning, cfg, neg_scale):
        from ..models.guidance_functions import PerpNegGuider as Guider

        guider = Guider(model)
        guider.set_conds(positive, negative, empty_conditioning)
        guider.set_cfg(cfg, neg_scale)
        return (guider,)


class TomePatchModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "ratio": _float(0.3, 0.0, 1.0, 0.01)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    def patch(self, model, ratio):
        from ..models.guidance_functions import tome_patches

        _check_range("TomePatchModel", "ratio", ratio, 0.0, 1.0)
        merge_queries, unmerge_output = tome_patches(ratio)
        patched = model.clone()
        patched.set_model_attn1_patch(merge_queries)
        patched.set_model_attn1_output_patch(unmerge_output)
        return (patched,)


class Mahiro:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True

    def patch(self, model):
        from ..models.guidance_functions import mahiro_post_cfg_function

        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(mahiro_post_cfg_function())
        return (patched,)


class TCFG:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "advanced/guidance"

    def patch(self, model):
        from ..models.guidance_functions import tcfg_pre_cfg_function

        patched = model.clone()
        patched.set_model_sampler_pre_cfg_function(tcfg_pre_cfg_function())
        return (patched,)


class APG:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "eta": _float(1.0, -10.0, 10.0, 0.01),
            "norm_threshold": _float(5.0, 0.0, 50.0, 0.1),
            "momentum": _float(0.0, -5.0, 1.0, 0.01),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "sampling/custom_sampling"

    def patch(self, model, eta, norm_threshold, momentum):
        from ..models.guidance_functions import apg_pre_cfg_function

        _check_range("APG", "norm_threshold", norm_threshold, 0.0, 50.0)
        _check_range("APG", "momentum", momentum, -5.0, 1.0)
        patched = model.clone()
        patched.set_model_sampler_pre_cfg_function(apg_pre_cfg_function(eta, norm_threshold, momentum))
        return (patched,)


class FreSca:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "scale_low": _float(1.0, 0, 10, 0.01),
            "scale_high": _float(1.25, 0, 10, 0.01),
            "freq_cutoff": ("INT", {"default": 20, "min": 1, "max": 10000, "step": 1}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True

    def patch(self, model, scale_low, scale_high, freq_cutoff):
        from ..models.guidance_functions import fresca_pre_cfg_function

        _check_range("FreSca", "freq_cutoff", freq_cutoff, 1, 10000)
        patched = model.clone()
        patched.set_model_sampler_pre_cfg_function(fresca_pre_cfg_function(scale_low, scale_high, int(freq_cutoff)))
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "PerpNegGuider": PerpNegGuider,
    "TomePatchModel": TomePatchModel,
    "Mahiro": Mahiro,
    "TCFG": TCFG,
    "APG": APG,
    "FreSca": FreSca,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "PerpNegGuider": None,
    "TomePatchModel": None,
    "Mahiro": "Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)",
    "TCFG": "Tangential Damping CFG",
    "APG": "Adaptive Projected Guidance",
    "FreSca": "FreSca",
}
