"""GUIDER and NOISE values of ComfyUI's custom sampling, over this server's MODEL.

* :class:`Guider` is ComfyUI's CFGGuider: conditionings plus a cfg scale, turned into the guided denoiser
  (:class:`.denoising.CFGDenoiser`, with the MODEL's model_options) and run by ``sample(noise, latent, sampler,
  sigmas, ...)``.  :class:`BasicGuider` has only a positive side; :class:`DualCFGGuider` combines two positive
  conditionings and a negative one, "regular" or "nested".
* :class:`RandomNoise` / :class:`EmptyNoise`: ``.seed`` and ``.generate_noise(latent_dict)``.

A MODEL here is anything with unet_apply, model_sampling, encode_extra, process_latent_in/out and model_options
(models/diffusion_model.py).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .denoising import CFGDenoiser
from .ksampler import prepare_noise, prepare_noise_mask
from .sampler_object import KSamplerObject, sampler_object


class RandomNoise:
    """ComfyUI's Noise_RandomNoise: the initial noise KSampler would draw for ``seed``."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        return prepare_noise(input_latent["samples"], self.seed, input_latent.get("batch_index"))


class EmptyNoise:
    """ComfyUI's Noise_EmptyNoise: zeros (sampling a latent that already carries its noise)."""

    seed = 0

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        return torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout, device="cpu")


def _merge_options(base: dict, extra: Optional[dict]) -> dict:
    if not extra:
        return base
    merged = {**base, **extra}
    for key in ("sampler_pre_cfg_function", "sampler_post_cfg_function"):
        if key in base and key in extra:
            merged[key] = list(base[key]) + list(extra[key])
    return merged


class Guider:
    """ComfyUI's CFGGuider: ``set_conds(positive, negative)``, ``set_cfg(cfg)``, then ``sample(...)``.

    While sampling, the guider is also the denoiser: ``guider(x, sigma, model_options=None)`` -> x_0."""

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = getattr(model_patcher, "model_options", {}) or {}
        self.original_conds: dict = {}
        self.cfg = 1.0
        self._active: Optional[Callable] = None

    def set_conds(self, positive, negative) -> None:
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg: float) -> None:
        self.cfg = float(cfg)

    def inner_set_conds(self, conds: dict) -> None:
        self.original_conds = {name: list(value) if value is not None else None for name, value in conds.items()}

    @property
    def model_sampling(self):
        return self.model_patcher.model_sampling

    @property
    def inner_model(self):
        return self.model_patcher

    def _base_denoiser(self, positive, negative, cfg: float) -> CFGDenoiser:
        model = self.model_patcher
        return CFGDenoiser(model.unet_apply, positive, negative, cfg, model_sampling=model.model_sampling,
                           encode_extra=getattr(model, "encode_extra", None), model_options=self.model_options)

    def make_denoiser(self) -> Callable:
        """The guided denoiser D(x, sigma, model_options=None) for the current conds and cfg."""
        return self._base_denoiser(self.original_conds.get("positive"), self.original_conds.get("negative"),
                                   self.cfg)

    def __call__(self, x, sigma, model_options=None, seed=None, **_):
        denoiser = self._active if self._active is not None else self.make_denoiser()
        return denoiser(x, sigma, model_options=model_options) if model_options else denoiser(x, sigma)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        """ComfyUI's name for the guided x_0 prediction at noise level ``timestep``."""
        return self(x, timestep, model_options=model_options)

    def sample(self, noise: torch.Tensor, latent_image: torch.Tensor, sampler, sigmas: torch.Tensor,
               denoise_mask=None, callback=None, disable_pbar: bool = False, seed: Optional[int] = None,
               step_callback=None) -> torch.Tensor:
        """Sample ``latent_image`` (the LATENT's samples, in its own space) noised with ``noise`` along ``sigmas``
        with ``sampler`` (SAMPLER); returns samples in the same space.  ``callback(step, x0, x, total)`` is
        ComfyUI's; ``step_callback(step, x, x0, total)`` this server's."""
        if sigmas.shape[-1] == 0:
            return latent_image
        if isinstance(sampler, str):
            sampler = sampler_object(sampler)
        model = self.model_patcher
        latent = latent_image.to(torch.float32)
        model_latent = model.process_latent_in(latent) if torch.count_nonzero(latent) > 0 else latent
        mask = None
        if denoise_mask is not None:
            mask = prepare_noise_mask(denoise_mask, latent.shape, latent.device)

        def report(step, x, denoised, total):
            if step_callback is not None:
                step_callback(step, x, denoised, total)
            if callback is not None:
                callback(step, denoised, x, total)

        noise = noise.to(latent.device, torch.float32)
        self._active = self.make_denoiser()
        for denoiser in _cfg_denoisers(self._active):
            denoiser.begin_sampling(model_latent, mask, seed)
        try:
            if isinstance(sampler, KSamplerObject):
                samples = sampler.run(self._active, model.model_sampling, noise, model_latent, sigmas, seed=seed,
                                      denoise_mask=mask, callback=report)
            elif hasattr(sampler, "sample"):  # a pack's own Sampler subclass
                samples = sampler.sample(self, sigmas, {"model_options": {}, "seed": seed},
                                         lambda i, x0, x, n: report(i, x, x0, n), noise, model_latent, mask,
                                         disable_pbar)
            else:
                raise TypeError(f"not a SAMPLER: {type(sampler).__name__}")
        finally:
            for denoiser in _cfg_denoisers(self._active):
                denoiser.end_sampling()
            self._active = None
        return model.process_latent_out(samples.to(torch.float32))


class BasicGuider(Guider):
    """Only a positive conditioning, no guidance (cfg 1)."""

    def set_conds(self, positive) -> None:  # type: ignore[override]
        self.inner_set_conds({"positive": positive})


class _DualDenoiser:
    """D = neg + cfg2 (mid - neg) + cfg1 (pos - mid) ("regular"), or neg + cfg2 (mid + cfg1 (pos - mid) - neg)
    ("nested"); the cfg function and post-CFG hooks of the model options apply to the cfg2 (regular) or cfg1
    (nested) combination, as in ComfyUI."""

    def __init__(self, base: CFGDenoiser, middle: list, cfg1: float, cfg2: float, nested: bool):
        self.base, self.middle, self.cfg1, self.cfg2, self.nested = base, middle, cfg1, cfg2, nested
        self.parts = (base,)
        self.model_options = base.model_options

    def __call__(self, x, sigma, model_options=None):
        base = self.base
        options = _merge_options(base.model_options, model_options)
        if not getattr(base, "_controls_ready", True) and hasattr(base, "_pre_run_controls"):
            base._pre_run_controls()
        negative, middle, positive = base.negative, self.middle, base.positive
        if self.nested:
            out = base.calc_cond_batch([negative, middle, positive], x, sigma, options)
            text = base.cfg_function(out[2], out[1], x, sigma, options, cond=positive, uncond=middle)
            return out[0] + self.cfg2 * (text - out[0])
        if not options.get("disable_cfg1_optimization", False) and math.isclose(self.cfg2, 1.0):
            negative = None
            if math.isclose(self.cfg1, 1.0):
                middle = None
        out = base.calc_cond_batch([negative, middle, positive], x, sigma, options)
        guided = base.cfg_function(out[1], out[0], x, sigma, options, cond=middle, uncond=negative)
        return guided + (out[2] - out[1]) * self.cfg1


class DualCFGGuider(Guider):
    """ComfyUI's Guider_DualCFG: set_conds(cond1, cond2, negative), set_cfg(cfg_conds, cfg_cond2_negative,
    nested)."""

    def __init__(self, model_patcher):
        super().__init__(model_patcher)
        self.cfg1, self.cfg2, self.nested = 1.0, 1.0, False

    def set_conds(self, positive, middle, negative) -> None:  # type: ignore[override]
        self.inner_set_conds({"positive": positive, "middle": middle, "negative": negative})

    def set_cfg(self, cfg1: float, cfg2: float, nested: bool = False) -> None:  # type: ignore[override]
        self.cfg1, self.cfg2, self.nested = float(cfg1), float(cfg2), bool(nested)

    def make_denoiser(self) -> Callable:
        from .conditions import normalise_conditioning

        conds = self.original_conds
        base = self._base_denoiser(conds.get("positive"), conds.get("negative"),
                                   self.cfg1 if self.nested else self.cfg2)
        return _DualDenoiser(base, normalise_conditioning(conds.get("middle")), self.cfg1, self.cfg2, self.nested)


def _cfg_denoisers(denoiser) -> list:
    """The CFGDenoisers behind a guider's denoiser (itself, or those a composite guider keeps in `parts`)."""
    if isinstance(denoiser, CFGDenoiser):
        return [denoiser]
    return [part for part in getattr(denoiser, "parts", ()) if isinstance(part, CFGDenoiser)]
