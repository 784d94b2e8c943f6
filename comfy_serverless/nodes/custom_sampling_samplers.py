"""ComfyUI's SAMPLER nodes: KSamplerSelect (any sampler by name) and the samplers with their own parameters.

A SAMPLER is a sampling.sampler_object.KSamplerObject (a sampler name plus options), run by SamplerCustom /
SamplerCustomAdvanced or a guider. Standard library only at module level.
"""

from __future__ import annotations

from .sampling_nodes import SAMPLER_NAMES

SAMPLERS = "sampling/custom_sampling/samplers"


def _float(default, low=0.0, high=100.0):
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": 0.01, "round": False})


def _sampler(name, options=None):
    from ..sampling.sampler_object import sampler_object

    return (sampler_object(name, options),)


class _SamplerNode:
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = SAMPLERS


class KSamplerSelect(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler_name": (list(SAMPLER_NAMES),)}}

    def get_sampler(self, sampler_name):
        return _sampler(sampler_name)


class SamplerEulerAncestral(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": _float(1.0), "s_noise": _float(1.0)}}

    def get_sampler(self, eta, s_noise):
        return _sampler("euler_ancestral", {"eta": eta, "s_noise": s_noise})


class SamplerEulerAncestralCFGPP(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": _float(1.0, high=1.0), "s_noise": _float(1.0, high=10.0)}}

    def get_sampler(self, eta, s_noise):
        return _sampler("euler_ancestral_cfg_pp", {"eta": eta, "s_noise": s_noise})


class SamplerLMS(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"order": ("INT", {"default": 4, "min": 1, "max": 100})}}

    def get_sampler(self, order):
        return _sampler("lms", {"order": order})


NOISE_DEVICE = (["gpu", "cpu"],)


class SamplerDPMPP_2M_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver_type": (["midpoint", "heun"],), "eta": _float(1.0), "s_noise": _float(1.0),
                             "noise_device": NOISE_DEVICE}}

    def get_sampler(self, solver_type, eta, s_noise, noise_device):
        name = "dpmpp_2m_sde" if noise_device == "cpu" else "dpmpp_2m_sde_gpu"
        return _sampler(name, {"eta": eta, "s_noise": s_noise, "solver_type": solver_type})


class SamplerDPMPP_3M_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": _float(1.0), "s_noise": _float(1.0), "noise_device": NOISE_DEVICE}}

    def get_sampler(self, eta, s_noise, noise_device):
        name = "dpmpp_3m_sde" if noise_device == "cpu" else "dpmpp_3m_sde_gpu"
        return _sampler(name, {"eta": eta, "s_noise": s_noise})


class SamplerDPMPP_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": _float(1.0), "s_noise": _float(1.0), "r": _float(0.5),
                             "noise_device": NOISE_DEVICE}}

    def get_sampler(self, eta, s_noise, r, noise_device):
        name = "dpmpp_sde" if noise_device == "cpu" else "dpmpp_sde_gpu"
        return _sampler(name, {"eta": eta, "s_noise": s_noise, "r": r})


class SamplerDPMPP_2S_Ancestral(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": _float(1.0), "s_noise": _float(1.0)}}

    def get_sampler(self, eta, s_noise):
        return _sampler("dpmpp_2s_ancestral", {"eta": eta, "s_noise": s_noise})


class SamplerDPMAdaptative(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "order": ("INT", {"default": 3, "min": 2, "max": 3}),
            "rtol": _float(0.05), "atol": _float(0.0078), "h_init": _float(0.05), "pcoeff": _float(0.0),
            "icoeff": _float(1.0), "dcoeff": _float(0.0), "accept_safety": _float(0.81), "eta": _float(0.0),
            "s_noise": _float(1.0),
        }}

    def get_sampler(self, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise):
        if h_init <= 0:
            raise ValueError("h_init must be above 0")
        return _sampler("dpm_adaptive", {"order": order, "rtol": rtol, "atol": atol, "h_init": h_init,
                                         "pcoeff": pcoeff, "icoeff": icoeff, "dcoeff": dcoeff,
                                         "accept_safety": accept_safety, "eta": eta, "s_noise": s_noise})


class SamplerER_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "solver_type": ("COMBO", {"options": ["ER-SDE", "Reverse-time SDE", "ODE"]}),
            "max_stage": ("INT", {"default": 3, "min": 1, "max": 3}),
            "eta": _float(1.0),
            "s_noise": _float(1.0),
        }}

    def get_sampler(self, solver_type, max_stage, eta, s_noise):
        if solver_type not in ("ER-SDE", "Reverse-time SDE", "ODE"):
            raise ValueError(f"unknown solver_type {solver_type!r}; expected ER-SDE, Reverse-time SDE or ODE")
        if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
            eta, s_noise = 0.0, 0.0
        noise_scaler = None  # ER-SDE: the paper's scaler
        if solver_type != "ER-SDE":
            power = eta + 1

            def noise_scaler(x):  # reverse-time SDE: noise scale sigma^(eta + 1) (eta 0 = the ODE)
                return x ** power

        return _sampler("er_sde", {"s_noise": s_noise, "noise_scaler": noise_scaler, "max_stage": max_stage})


class SamplerSASolver(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {}),
            "eta": _float(1.0, high=10.0),
            "sde_start_percent": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.001}),
            "sde_end_percent": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.001}),
            "s_noise": _float(1.0),
            "predictor_order": ("INT", {"default": 3, "min": 1, "max": 6}),
            "corrector_order": ("INT", {"default": 4, "min": 0, "max": 6}),
            "use_pece": ("BOOLEAN", {}),
            "simple_order_2": ("BOOLEAN", {}),
        }}

    def get_sampler(self, model, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order,
                    corrector_order, use_pece, simple_order_2):
        from ..sampling.samplers_sde import tau_interval

        model_sampling = model.model_sampling
        tau = tau_interval(model_sampling.percent_to_sigma(sde_start_percent),
                           model_sampling.percent_to_sigma(sde_end_percent), eta=eta)
        return _sampler("sa_solver", {"tau_func": tau, "s_noise": s_noise, "predictor_order": predictor_order,
                                      "corrector_order": corrector_order, "use_pece": use_pece,
                                      "simple_order_2": simple_order_2})


class SamplerLCMUpscale(_SamplerNode):
    UPSCALE_METHODS = ["bislerp", "nearest-exact", "bilinear", "area", "bicubic"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scale_ratio": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 20.0, "step": 0.01}),
            "scale_steps": ("INT", {"default": -1, "min": -1, "max": 1000, "step": 1}),
            "upscale_method": ("COMBO", {"multiselect": False, "options": list(cls.UPSCALE_METHODS)}),
        }}

    def get_sampler(self, scale_ratio, scale_steps, upscale_method):
        from ..sampling.sampler_object import KSamplerObject
        from ..sampling.samplers_multistep import sample_lcm_upscale

        if upscale_method not in self.UPSCALE_METHODS:
            raise ValueError(f"unknown upscale_method {upscale_method!r}; expected one of {self.UPSCALE_METHODS}")
        options = {"total_upscale": scale_ratio, "upscale_steps": None if scale_steps < 0 else scale_steps,
                   "upscale_method": upscale_method}
        return (KSamplerObject(_lcm_upscale_entry(sample_lcm_upscale), options),)


def _lcm_upscale_entry(function):
    from ..sampling.samplers import SamplerEntry

    return SamplerEntry(function, noise="global", stochastic=True)


class SamplerEulerCFGpp(_SamplerNode):
    EXPERIMENTAL = True
    CATEGORY = "_for_testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"version": ("COMBO", {"multiselect": False, "options": ["regular", "alternative"]})}}

    def get_sampler(self, version):
        from ..sampling.sampler_object import KSamplerObject
        from ..sampling.samplers import SamplerEntry
        from ..sampling.samplers_cfgpp import sample_euler_cfg_pp_alternative

        if version == "alternative":
            return (KSamplerObject(SamplerEntry(sample_euler_cfg_pp_alternative, cfg_pp=True)),)
        if version != "regular":
            raise ValueError(f"unknown version {version!r}; expected 'regular' or 'alternative'")
        return _sampler("euler_cfg_pp")


NODE_CLASS_MAPPINGS = {
    "KSamplerSelect": KSamplerSelect,
    "SamplerEulerAncestral": SamplerEulerAncestral,
    "SamplerEulerAncestralCFGPP": SamplerEulerAncestralCFGPP,
    "SamplerLMS": SamplerLMS,
    "SamplerDPMPP_2M_SDE": SamplerDPMPP_2M_SDE,
    "SamplerDPMPP_3M_SDE": SamplerDPMPP_3M_SDE,
    "SamplerDPMPP_SDE": SamplerDPMPP_SDE,
    "SamplerDPMPP_2S_Ancestral": SamplerDPMPP_2S_Ancestral,
    "SamplerDPMAdaptative": SamplerDPMAdaptative,
    "SamplerER_SDE": SamplerER_SDE,
    "SamplerSASolver": SamplerSASolver,
    "SamplerLCMUpscale": SamplerLCMUpscale,
    "SamplerEulerCFGpp": SamplerEulerCFGpp,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: name for name in NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS.update({"SamplerEulerAncestralCFGPP": "SamplerEulerAncestralCFG++",
                                   "SamplerLCMUpscale": None, "SamplerEulerCFGpp": "SamplerEulerCFG++"})
