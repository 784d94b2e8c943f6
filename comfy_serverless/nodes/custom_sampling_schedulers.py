"""ComfyUI's scheduler and sigma nodes (SIGMAS = a 1-D float tensor of noise levels, usually ending in 0).

The lists come from sampling/schedules.py and sampling/sigma_schedules.py. Left out: GITSScheduler (its
tables are per-step-count data this server does not carry) and OptimalStepsScheduler (its tables are for FLUX,
Wan and Chroma, flow models this server does not run). Standard library only at module level.
"""

from __future__ import annotations

from .sampling_nodes import SCHEDULER_NAMES

STEPS = ("INT", {"default": 20, "min": 1, "max": 10000})
DENOISE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})
SIGMA_MAX = ("FLOAT", {"default": 14.614642, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False})
SIGMA_MIN = ("FLOAT", {"default": 0.0291675, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False})
SCHEDULERS = "sampling/custom_sampling/schedulers"
SIGMA_TOOLS = "sampling/custom_sampling/sigmas"


def _positive_range(sigma_max: float, sigma_min: float) -> None:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigma_min and sigma_max must be above 0 (got {sigma_min} and {sigma_max})")


class BasicScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scheduler": (list(SCHEDULER_NAMES),), "steps": STEPS,
                             "denoise": DENOISE}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, model, scheduler, steps, denoise):
        from ..sampling.sigma_schedules import basic_sigmas

        return (basic_sigmas(model.model_sampling, scheduler, steps, denoise),)


class KarrasScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": STEPS, "sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN,
                             "rho": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                               "round": False})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, steps, sigma_max, sigma_min, rho):
        from ..sampling.schedules import karras_sigmas

        if rho <= 0:
            raise ValueError("rho must be above 0")
        return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": STEPS, "sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, steps, sigma_max, sigma_min):
        from ..sampling.schedules import exponential_sigmas

        _positive_range(sigma_max, sigma_min)
        return (exponential_sigmas(steps, sigma_min, sigma_max),)


class PolyexponentialScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": STEPS, "sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN,
                             "rho": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                               "round": False})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, steps, sigma_max, sigma_min, rho):
        from ..sampling.sigma_schedules import polyexponential_sigmas

        _positive_range(sigma_max, sigma_min)
        return (polyexponential_sigmas(steps, sigma_min, sigma_max, rho),)


class LaplaceScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": STEPS, "sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN,
                             "mu": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.1,
                                              "round": False}),
                             "beta": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.1,
                                                "round": False})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, steps, sigma_max, sigma_min, mu, beta):
        from ..sampling.sigma_schedules import laplace_sigmas

        return (laplace_sigmas(steps, sigma_min, sigma_max, mu, beta),)


class VPScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": STEPS,
                             "beta_d": ("FLOAT", {"default": 19.9, "min": 0.0, "max": 5000.0, "step": 0.01,
                                                  "round": False}),
                             "beta_min": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 5000.0, "step": 0.01,
                                                    "round": False}),
                             "eps_s": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001,
                                                 "round": False})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, steps, beta_d, beta_min, eps_s):
        from ..sampling.sigma_schedules import vp_sigmas

        return (vp_sigmas(steps, beta_d, beta_min, eps_s),)


class BetaSamplingScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "steps": STEPS,
                             "alpha": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 50.0, "step": 0.01,
                                                 "round": False}),
                             "beta": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 50.0, "step": 0.01,
                                                "round": False})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, model, steps, alpha, beta):
        from ..sampling.sigma_schedules import beta_sampling_sigmas

        return (beta_sampling_sigmas(model.model_sampling, steps, alpha, beta),)


class SDTurboScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "steps": ("INT", {"default": 1, "min": 1, "max": 10}),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, model, steps, denoise):
        from ..sampling.sigma_schedules import sd_turbo_sigmas

        return (sd_turbo_sigmas(model.model_sampling, steps, denoise),)


class AlignYourStepsScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_type": ("COMBO", {"multiselect": False, "options": ["SD1", "SDXL", "SVD"]}),
                             "steps": ("INT", {"default": 10, "min": 1, "max": 10000}),
                             "denoise": DENOISE}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SCHEDULERS

    def get_sigmas(self, model_type, steps, denoise):
        from ..sampling.sigma_schedules import align_your_steps_sigmas

        return (align_your_steps_sigmas(model_type, steps, denoise),)


class SplitSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",), "step": ("INT", {"default": 0, "min": 0, "max": 10000})}}

    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"
    CATEGORY = SIGMA_TOOLS

    def get_sigmas(self, sigmas, step):
        from ..sampling.sigma_schedules import split_at_step

        return split_at_step(sigmas, step)


class SplitSigmasDenoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",), "denoise": DENOISE}}

    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"
    CATEGORY = SIGMA_TOOLS

    def get_sigmas(self, sigmas, denoise):
        from ..sampling.sigma_schedules import split_at_denoise

        return split_at_denoise(sigmas, denoise)


class FlipSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",)}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = SIGMA_TOOLS

    def get_sigmas(self, sigmas):
        from ..sampling.sigma_schedules import flip

        return (flip(sigmas),)


class SetFirstSigma:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",),
                             "sigma": ("FLOAT", {"default": 136.0, "min": 0.0, "max": 20000.0, "step": 0.001,
                                                 "round": False})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "set_first_sigma"
    CATEGORY = SIGMA_TOOLS

    def set_first_sigma(self, sigmas, sigma):
        from ..sampling.sigma_schedules import set_first

        return (set_first(sigmas, sigma),)


class ExtendIntermediateSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sigmas": ("SIGMAS",),
            "steps": ("INT", {"default": 2, "min": 1, "max": 100}),
            "start_at_sigma": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 20000.0, "step": 0.01, "round": False}),
            "end_at_sigma": ("FLOAT", {"default": 12.0, "min": 0.0, "max": 20000.0, "step": 0.01, "round": False}),
            "spacing": (["linear", "cosine", "sine"],),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "extend"
    CATEGORY = SIGMA_TOOLS

    def extend(self, sigmas, steps, start_at_sigma, end_at_sigma, spacing):
        from ..sampling.sigma_schedules import extend_intermediate

        return (extend_intermediate(sigmas, steps, start_at_sigma, end_at_sigma, spacing),)


class SamplingPercentToSigma:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {}),
            "sampling_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001}),
            "return_actual_sigma": ("BOOLEAN", {"default": False, "tooltip": "Return the model's sigma_max / "
                                               "sigma_min at 0.0 / 1.0 instead of the interval-check values."}),
        }}

    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("sigma_value",)
    FUNCTION = "get_sigma"
    CATEGORY = SIGMA_TOOLS

    def get_sigma(self, model, sampling_percent, return_actual_sigma):
        model_sampling = model.model_sampling
        sigma = model_sampling.percent_to_sigma(sampling_percent)
        if return_actual_sigma:
            if sampling_percent == 0.0:
                sigma = float(model_sampling.sigma_max)
            elif sampling_percent == 1.0:
                sigma = float(model_sampling.sigma_min)
        return (float(sigma),)


NODE_CLASS_MAPPINGS = {
    "BasicScheduler": BasicScheduler,
    "KarrasScheduler": KarrasScheduler,
    "ExponentialScheduler": ExponentialScheduler,
    "PolyexponentialScheduler": PolyexponentialScheduler,
    "LaplaceScheduler": LaplaceScheduler,
    "VPScheduler": VPScheduler,
    "BetaSamplingScheduler": BetaSamplingScheduler,
    "SDTurboScheduler": SDTurboScheduler,
    "AlignYourStepsScheduler": AlignYourStepsScheduler,
    "SplitSigmas": SplitSigmas,
    "SplitSigmasDenoise": SplitSigmasDenoise,
    "FlipSigmas": FlipSigmas,
    "SetFirstSigma": SetFirstSigma,
    "ExtendIntermediateSigmas": ExtendIntermediateSigmas,
    "SamplingPercentToSigma": SamplingPercentToSigma,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: name for name in NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS["AlignYourStepsScheduler"] = None
