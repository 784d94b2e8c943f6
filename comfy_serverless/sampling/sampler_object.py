"""SAMPLER values: a sampler plus its options, as ComfyUI's KSAMPLER objects travel between nodes.

:class:`KSamplerObject` runs one of this server's samplers by name (see samplers.SAMPLER_ENTRIES) with extra
options, or a pack's k-diffusion-style function ``fn(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)`` where ``model(x, sigma, **extra_args)`` returns the x_0 estimate and ``callback``
receives ComfyUI's step dict.  :meth:`KSamplerObject.run` does what ComfyUI's KSAMPLER.sample does around the
algorithm: noise the latent to the first level, keep the unmasked region of an inpainting mask on the original
latent's trajectory, and undo the noise scaling at the end.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .sampler_common import DenoiseFn, StepCallback
from .samplers import SAMPLER_ENTRIES, SamplerEntry, get_entry, run_entry


def per_item_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def inpainting_denoiser(denoise_fn: DenoiseFn, model_sampling, latent_image: torch.Tensor, noise: torch.Tensor,
                        denoise_mask: torch.Tensor, sigmas: Optional[torch.Tensor] = None) -> DenoiseFn:
    """Keep the unmasked region on the original latent's trajectory: before each model call it is replaced
    by the latent noised with the fixed ``noise`` to the current sigma, and the x_0 estimate there is the
    latent itself (mask 1 = regenerate, 0 = keep).

    A "denoise_mask_function" in the denoiser's model options (DifferentialDiffusion) changes the mask per
    step: fn(sigma, mask, extra_options={"model": denoiser, "sigmas": sigmas}) -> mask, as in ComfyUI."""
    mask_function = (getattr(denoise_fn, "model_options", None) or {}).get("denoise_mask_function")

    def denoise(x, sigma, **kwargs):
        mask = denoise_mask
        if mask_function is not None:
            mask = mask_function(sigma, denoise_mask, extra_options={"model": denoise_fn, "sigmas": sigmas})
        keep = 1.0 - mask
        noised_latent = model_sampling.noise_scaling(per_item_view(sigma, noise), noise, latent_image)
        x = x * mask + noised_latent * keep
        return denoise_fn(x, sigma, **kwargs) * mask + latent_image * keep

    return denoise


class _KDiffusionModel:
    """What a pack's k-diffusion-style sampler calls as ``model``: model(x, sigma, **extra_args) -> x_0."""

    def __init__(self, denoise_fn: DenoiseFn, model_sampling):
        self.denoise_fn = denoise_fn
        self.model_sampling = model_sampling
        self.inner_model = self  # packs reach model.inner_model.inner_model.model_sampling

    def __call__(self, x, sigma, model_options=None, seed=None, **_):
        if model_options:
            return self.denoise_fn(x, sigma, model_options=model_options)
        return self.denoise_fn(x, sigma)


class KSamplerObject:
    """ComfyUI's KSAMPLER: ``sampler_function`` is a sampler name, a :class:`SamplerEntry`, or a pack's
    k-diffusion-style function; ``extra_options`` go to it as keywords; ``inpaint_options={"random": True}``
    re-noises the kept region of a mask with independent noise (ComfyUI's ddim)."""

    def __init__(self, sampler_function, extra_options: Optional[dict] = None, inpaint_options: Optional[dict] = None):
        self.name: Optional[str] = None
        if isinstance(sampler_function, str):
            self.name = sampler_function
            self.entry: Optional[SamplerEntry] = get_entry(sampler_function)
        elif isinstance(sampler_function, SamplerEntry):
            self.entry = sampler_function
        else:
            if not callable(sampler_function):
                raise TypeError(f"a sampler function must be callable, got {type(sampler_function).__name__}")
            self.entry = None
        self.sampler_function = sampler_function if self.entry is None else self.entry.function
        self.extra_options = dict(extra_options or {})
        self.inpaint_options = dict(inpaint_options or {})

    def __repr__(self) -> str:
        return f"KSamplerObject({self.name or getattr(self.sampler_function, '__name__', 'custom')!r})"

    @staticmethod
    def max_denoise(model_sampling, sigmas: torch.Tensor) -> bool:
        """Whether sampling starts from pure noise (the first level is the model's largest)."""
        sigma_max = float(model_sampling.sigma_max)
        first = float(sigmas[0])
        return math.isclose(sigma_max, first, rel_tol=1e-5) or first > sigma_max

    def run(self, denoise_fn: DenoiseFn, model_sampling, noise: torch.Tensor, latent_image: torch.Tensor,
            sigmas: torch.Tensor, *, seed: Optional[int] = None, denoise_mask: Optional[torch.Tensor] = None,
            callback: Optional[StepCallback] = None) -> torch.Tensor:
        """Sample from ``latent_image`` (model space) noised with ``noise`` along ``sigmas``; ``denoise_mask``
        already at the latent's shape.  callback(step, x, x0, total) after each step."""
        if sigmas.shape[-1] == 0:
            return latent_image
        sigmas = sigmas.to(latent_image.device)
        if denoise_mask is not None:
            inpaint_noise = noise
            if self.inpaint_options.get("random", False):
                generator = torch.Generator(device="cpu")
                generator.manual_seed((41 if seed is None else seed) + 1)
                inpaint_noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise)
            denoise_fn = inpainting_denoiser(denoise_fn, model_sampling, latent_image, inpaint_noise, denoise_mask,
                                             sigmas)
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_sampling, sigmas))
        if len(sigmas) > 1:
            if self.entry is not None:
                x = run_entry(self.entry, denoise_fn, x, sigmas, seed=seed, callback=callback,
                              model_sampling=model_sampling, options=self.extra_options)
            else:
                x = self._run_kdiffusion(denoise_fn, model_sampling, x, sigmas, seed, callback)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)

    def _run_kdiffusion(self, denoise_fn, model_sampling, x, sigmas, seed, callback):
        total = len(sigmas) - 1
        step_callback: Optional[Callable] = None
        if callback is not None:
            def step_callback(info):
                callback(int(info["i"]), info["x"], info["denoised"], total)
        extra_args = {"model_options": {}, "seed": seed}
        return self.sampler_function(_KDiffusionModel(denoise_fn, model_sampling), x, sigmas, extra_args=extra_args,
                                     callback=step_callback, disable=True, **self.extra_options)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        """ComfyUI's KSAMPLER.sample: ``model_wrap`` is a guider (callable as denoiser, with model_sampling);
        ``callback(step, x0, x, total)`` in ComfyUI's argument order; returns model-space samples."""
        latent = torch.zeros_like(noise) if latent_image is None else latent_image
        step = None
        if callback is not None:
            def step(i, x, denoised, total):
                callback(i, denoised, x, total)
        seed = (extra_args or {}).get("seed")
        return self.run(model_wrap, model_wrap.model_sampling, noise, latent, sigmas, seed=seed,
                        denoise_mask=denoise_mask, callback=step)


def sampler_object(name: str, extra_options: Optional[dict] = None) -> KSamplerObject:
    """ComfyUI's comfy.samplers.sampler_object: the SAMPLER for a KSampler sampler name."""
    if name not in SAMPLER_ENTRIES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {list(SAMPLER_ENTRIES)}")
    return KSamplerObject(name, extra_options, {"random": True} if name == "ddim" else None)
