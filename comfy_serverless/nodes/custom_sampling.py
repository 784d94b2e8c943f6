"""ComfyUI's custom sampling nodes: SamplerCustom(Advanced), noise, guiders, AddNoise.

The SAMPLER, SIGMAS, NOISE and GUIDER values come from custom_sampling_samplers.py /
custom_sampling_schedulers.py and the classes of sampling/guiders.py. Progress and interrupts go through the
KSampler nodes' step_callback. Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

from .sampling_nodes import SEED_MAX, step_callback

CFG = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})


def _fix_empty_latent_channels(model, samples):
    """An all-zero latent with another channel count than the model's gets the model's (SD: 4)."""
    import torch

    channels = getattr(model, "latent_channels", 4)
    if samples.shape[1] != channels and torch.count_nonzero(samples) == 0:
        samples = torch.zeros((samples.shape[0], channels) + tuple(samples.shape[2:]), dtype=samples.dtype)
    return samples


def _check_sigmas(sigmas):
    import torch

    if not torch.is_tensor(sigmas) or sigmas.ndim != 1:
        raise ValueError("sigmas must be a 1-D SIGMAS tensor (from a scheduler node)")


def _run_guider(guider, noise, sampler, sigmas, latent_image):
    """Both SamplerCustom nodes: sample, and also return the last step's x_0 estimate as a LATENT."""
    _check_sigmas(sigmas)
    latent = dict(latent_image)
    model = guider.model_patcher
    latent["samples"] = _fix_empty_latent_channels(model, latent["samples"])
    steps = max(int(sigmas.shape[-1]) - 1, 1)
    progress = step_callback(model, steps)
    last_x0 = {}

    def on_step(step, x, denoised, total):
        last_x0["x0"] = denoised
        progress(step, x, denoised, total)

    samples = guider.sample(noise.generate_noise(latent), latent["samples"], sampler, sigmas,
                            denoise_mask=latent.get("noise_mask"), seed=noise.seed, step_callback=on_step)
    out = dict(latent)
    out["samples"] = samples
    if "x0" not in last_x0:
        return out, out
    denoised = dict(latent)
    denoised["samples"] = model.process_latent_out(last_x0["x0"].cpu().float())
    return out, denoised


class SamplerCustom:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": ("BOOLEAN", {"default": True}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "cfg": CFG,
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }}

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"

    def sample(self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
        from ..sampling.guiders import EmptyNoise, Guider, RandomNoise

        guider = Guider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        noise = RandomNoise(noise_seed) if add_noise else EmptyNoise()
        if not add_noise:
            noise.seed = noise_seed  # the sampler's own noise is still seeded from noise_seed
        return _run_guider(guider, noise, sampler, sigmas, latent_image)


class SamplerCustomAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise": ("NOISE",),
            "guider": ("GUIDER",),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }}

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"

    def sample(self, noise, guider, sampler, sigmas, latent_image):
        return _run_guider(guider, noise, sampler, sigmas, latent_image)


class RandomNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
        }}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"

    def get_noise(self, noise_seed):
        from ..sampling.guiders import RandomNoise as Noise

        return (Noise(noise_seed),)


class DisableNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"

    def get_noise(self):
        from ..sampling.guiders import EmptyNoise

        return (EmptyNoise(),)


class AddNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "noise": ("NOISE",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "add_noise"
    CATEGORY = "_for_testing/custom_sampling/noise"

    def add_noise(self, model, noise, sigmas, latent_image):
        """Noise the latent to the level sigmas[0] - sigmas[-1] (or sigmas[0] for a single level)."""
        import torch

        _check_sigmas(sigmas)
        if len(sigmas) == 0:
            return (latent_image,)
        samples = latent_image["samples"]
        drawn = noise.generate_noise(latent_image)
        scale = torch.abs(sigmas[0] - sigmas[-1]) if len(sigmas) > 1 else sigmas[0]
        if torch.count_nonzero(samples) > 0:
            samples = model.process_latent_in(samples)
        noisy = model.model_sampling.noise_scaling(scale, drawn, samples)
        noisy = torch.nan_to_num(model.process_latent_out(noisy), nan=0.0, posinf=0.0, neginf=0.0)
        out = dict(latent_image)
        out["samples"] = noisy
        return (out,)


class BasicGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model, conditioning):
        from ..sampling.guiders import BasicGuider as Guider

        guider = Guider(model)
        guider.set_conds(conditioning)
        return (guider,)


class CFGGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "cfg": CFG,
        }}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model, positive, negative, cfg):
        from ..sampling.guiders import Guider

        guider = Guider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


class DualCFGGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "cond1": ("CONDITIONING",),
            "cond2": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "cfg_conds": CFG,
            "cfg_cond2_negative": CFG,
            "style": (["regular", "nested"],),
        }}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style="regular"):
        from ..sampling.guiders import DualCFGGuider as Guider

        guider = Guider(model)
        guider.set_conds(cond1, cond2, negative)
        guider.set_cfg(cfg_conds, cfg_cond2_negative, nested=style == "nested")
        return (guider,)


NODE_CLASS_MAPPINGS = {
    "SamplerCustom": SamplerCustom,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
    "RandomNoise": RandomNoise,
    "DisableNoise": DisableNoise,
    "AddNoise": AddNoise,
    "BasicGuider": BasicGuider,
    "CFGGuider": CFGGuider,
    "DualCFGGuider": DualCFGGuider,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: name for name in NODE_CLASS_MAPPINGS}
