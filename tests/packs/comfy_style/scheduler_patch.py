"""Adds a scheduler the way efficiency-nodes adds "AYS SD1" / "GITS": extend comfy.samplers.KSampler.SCHEDULERS,
replace comfy.samplers.calculate_sigmas, then sample through the core KSampler."""

import comfy.samplers
from comfy.sample import np  # noqa: F401  (efficiency imports numpy from here)

import nodes

_original = comfy.samplers.calculate_sigmas


def _calculate_sigmas(model_sampling, scheduler_name, steps):
    if scheduler_name == "Halved karras":
        return _original(model_sampling, "karras", steps) * 0.5
    return _original(model_sampling, scheduler_name, steps)


comfy.samplers.calculate_sigmas = _calculate_sigmas
comfy.samplers.KSampler.SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS + ["Halved karras"]


class PatchedSchedulerSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "latent_image": ("LATENT",),
                             "scheduler": (comfy.samplers.KSampler.SCHEDULERS,)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "comfy_style"

    def sample(self, model, positive, negative, latent_image, scheduler):
        return nodes.KSampler().sample(model, 5, 2, 4.0, "euler", scheduler, positive, negative, latent_image)


NODE_CLASS_MAPPINGS = {"PatchedSchedulerSampler": PatchedSchedulerSampler}
