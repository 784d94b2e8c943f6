"""DifferentialDiffusion: inpainting with a soft mask read as "how early each pixel may change".

The sampler calls the model's model_options["denoise_mask_function"](sigma, denoise_mask, extra_options) before
each step (sampling/sampler_object.py). This node's function turns the soft mask into a binary one that grows as
sampling advances: with progress measured in model timesteps,

    threshold = (t(sigma) - t(sigma_end)) / (t(sigma_start) - t(sigma_end))     (1 at the first step, 0 at the end)
    mask'     = mask >= threshold

where sigma_start is the schedule's first level and sigma_end its last, or the model's smallest sigma when the
schedule ends below it (at 0). A strength below 1 blends: strength * mask' + (1 - strength) * mask. As in
ComfyUI, strength 0 counts as unset and gives the plain binary mask.

Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations


class DifferentialMask:
    """The denoise_mask_function DifferentialDiffusion installs (a class so it shows its strength in reprs)."""

    def __init__(self, strength: float = 1.0):
        self.strength = strength

    def __repr__(self) -> str:
        return f"DifferentialMask(strength={self.strength})"

    def __call__(self, sigma, denoise_mask, extra_options):
        model_sampling = _model_sampling(extra_options["model"])
        sigmas = extra_options["sigmas"]
        threshold = progress_threshold(model_sampling, sigmas, sigma)
        binary = (denoise_mask >= threshold).to(denoise_mask.dtype)
        if self.strength and self.strength < 1:
            return self.strength * binary + (1 - self.strength) * denoise_mask
        return binary


def _model_sampling(model):
    """The schedule of the model being sampled: a guider's inner model's, or the denoiser's own."""
    inner = getattr(model, "inner_model", None)
    found = getattr(inner, "model_sampling", None) if inner is not None else None
    if found is None:
        found = getattr(model, "model_sampling", None)
    if found is None:
        raise TypeError(f"DifferentialDiffusion: the sampled model ({type(model).__name__}) has no model_sampling "
                        f"to measure sampling progress with")
    return found


def progress_threshold(model_sampling, sigmas, sigma) -> float:
    """1 at the schedule's first level, 0 at its end, linear in model timesteps in between."""
    sigma_end = max(float(sigmas[-1]), float(model_sampling.sigma_min))
    ts_start = float(model_sampling.timestep(sigmas[0]))
    ts_end = float(model_sampling.timestep(sigma_end))
    current = float(model_sampling.timestep(sigma.reshape(-1)[0]))
    if ts_start == ts_end:  # a schedule without a range: nothing to spread the mask over
        return 0.0
    return (current - ts_end) / (ts_start - ts_end)


class DifferentialDiffusion:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL", {})},
            "optional": {"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})},
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    DESCRIPTION = ("Inpainting with a soft mask: a pixel starts changing once sampling has progressed past its mask "
                   "value's share (white first, grey later); strength below 1 blends that with the soft mask.")

    def apply(self, model, strength=1.0):
        patched = model.clone()
        patched.model_options["denoise_mask_function"] = DifferentialMask(strength)
        return (patched,)


NODE_CLASS_MAPPINGS = {"DifferentialDiffusion": DifferentialDiffusion}
NODE_DISPLAY_NAME_MAPPINGS = {"DifferentialDiffusion": "Differential Diffusion"}
