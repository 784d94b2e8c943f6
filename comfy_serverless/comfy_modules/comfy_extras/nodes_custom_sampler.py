"""ComfyUI's `comfy_extras.nodes_custom_sampler`: the custom sampling nodes (comfy_serverless/nodes/custom_sampling*.py)
and the Noise_RandomNoise / Noise_EmptyNoise / Guider_Basic / Guider_DualCFG classes packs build on."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.custom_sampling import (
    AddNoise,
    BasicGuider,
    CFGGuider,
    DisableNoise,
    DualCFGGuider,
    RandomNoise,
    SamplerCustom,
    SamplerCustomAdvanced,
)
from comfy_serverless.nodes.custom_sampling_samplers import (
    KSamplerSelect,
    SamplerDPMAdaptative,
    SamplerDPMPP_2M_SDE,
    SamplerDPMPP_2S_Ancestral,
    SamplerDPMPP_3M_SDE,
    SamplerDPMPP_SDE,
    SamplerER_SDE,
    SamplerEulerAncestral,
    SamplerEulerAncestralCFGPP,
    SamplerLMS,
    SamplerSASolver,
)
from comfy_serverless.nodes.custom_sampling_schedulers import (
    BasicScheduler,
    BetaSamplingScheduler,
    ExponentialScheduler,
    ExtendIntermediateSigmas,
    FlipSigmas,
    KarrasScheduler,
    LaplaceScheduler,
    PolyexponentialScheduler,
    SamplingPercentToSigma,
    SDTurboScheduler,
    SetFirstSigma,
    SplitSigmas,
    SplitSigmasDenoise,
    VPScheduler,
)

NODE_CLASS_MAPPINGS = {
    "SamplerCustom": SamplerCustom,
    "BasicScheduler": BasicScheduler,
    "KarrasScheduler": KarrasScheduler,
    "ExponentialScheduler": ExponentialScheduler,
    "PolyexponentialScheduler": PolyexponentialScheduler,
    "LaplaceScheduler": LaplaceScheduler,
    "VPScheduler": VPScheduler,
    "BetaSamplingScheduler": BetaSamplingScheduler,
    "SDTurboScheduler": SDTurboScheduler,
    "KSamplerSelect": KSamplerSelect,
    "SamplerEulerAncestral": SamplerEulerAncestral,
    "SamplerEulerAncestralCFGPP": SamplerEulerAncestralCFGPP,
    "SamplerLMS": SamplerLMS,
    "SamplerDPMPP_3M_SDE": SamplerDPMPP_3M_SDE,
    "SamplerDPMPP_2M_SDE": SamplerDPMPP_2M_SDE,
    "SamplerDPMPP_SDE": SamplerDPMPP_SDE,
    "SamplerDPMPP_2S_Ancestral": SamplerDPMPP_2S_Ancestral,
    "SamplerDPMAdaptative": SamplerDPMAdaptative,
    "SamplerER_SDE": SamplerER_SDE,
    "SamplerSASolver": SamplerSASolver,
    "SplitSigmas": SplitSigmas,
    "SplitSigmasDenoise": SplitSigmasDenoise,
    "FlipSigmas": FlipSigmas,
    "SetFirstSigma": SetFirstSigma,
    "ExtendIntermediateSigmas": ExtendIntermediateSigmas,
    "SamplingPercentToSigma": SamplingPercentToSigma,
    "CFGGuider": CFGGuider,
    "DualCFGGuider": DualCFGGuider,
    "BasicGuider": BasicGuider,
    "RandomNoise": RandomNoise,
    "DisableNoise": DisableNoise,
    "AddNoise": AddNoise,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {"SamplerEulerAncestralCFGPP": "SamplerEulerAncestralCFG++"}

_CLASSES = {
    "Noise_RandomNoise": ("comfy_serverless.sampling.guiders", "RandomNoise"),
    "Noise_EmptyNoise": ("comfy_serverless.sampling.guiders", "EmptyNoise"),
    "Guider_Basic": ("comfy_serverless.sampling.guiders", "BasicGuider"),
    "Guider_DualCFG": ("comfy_serverless.sampling.guiders", "DualCFGGuider"),
}


def __getattr__(name: str):
    if name in _CLASSES:  # torch-backed classes, imported on first use
        import importlib

        module, attribute = _CLASSES[name]
        return getattr(importlib.import_module(module), attribute)
    return missing_attribute(__name__, name)
