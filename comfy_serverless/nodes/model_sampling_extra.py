"""Continuous-time model sampling nodes: ModelSamplingContinuousEDM and ModelSamplingContinuousV (the noise
schedule and output parameterisation of EDM-trained and continuous-v models, attached as the MODEL's
"model_sampling" object patch; Playground v2.5 also gets its latent format). Standard library only at module level."""

from __future__ import annotations

EDM_TYPES = ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")


def _sigma(default: float) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1000.0, "step": 0.001, "round": False})


class ModelSamplingContinuousEDM:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "sampling": (list(EDM_TYPES),),
                             "sigma_max": _sigma(120.0), "sigma_min": _sigma(0.002)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, sampling, sigma_max, sigma_min):
        from ..models.continuous_sampling import PlaygroundLatentFormat, continuous_edm_sampling

        patched = model.clone()
        patched.add_object_patch("model_sampling", continuous_edm_sampling(sampling, sigma_min, sigma_max))
        if sampling == "edm_playground_v2.5":
            patched.add_object_patch("latent_format", PlaygroundLatentFormat())
        return (patched,)


class ModelSamplingContinuousV:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "sampling": (["v_prediction"],),
                             "sigma_max": _sigma(500.0), "sigma_min": _sigma(0.03)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, sampling, sigma_max, sigma_min):
        from ..models.continuous_sampling import ContinuousVSampling

        if sampling != "v_prediction":
            raise ValueError(f"unknown sampling {sampling!r}; expected 'v_prediction'")
        patched = model.clone()
        patched.add_object_patch("model_sampling", ContinuousVSampling(sigma_min, sigma_max))
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "ModelSamplingContinuousEDM": ModelSamplingContinuousEDM,
    "ModelSamplingContinuousV": ModelSamplingContinuousV,
}
