"""KSampler glue: noise, inpainting masks, noise levels, running a sampler, and the KSampler nodes' functions.

The pieces, in the order a KSampler node uses them:

* :func:`prepare_noise` draws the initial noise exactly as ComfyUI does (CPU generator seeded with ``seed``).
* :func:`compute_sigmas` / :func:`slice_sigmas` pick the noise levels (scheduler, ``denoise``, start/end step).
* the guided denoiser comes from :mod:`.denoising` (ModelSampling, CFGDenoiser).
* :func:`run_sampler` noises the latent, wraps the denoiser for inpainting masks and runs the sampler.
* :func:`ksampler` / :func:`ksampler_advanced` do all of that with the KSampler / KSamplerAdvanced inputs.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch

from .denoising import CFGDenoiser, ModelSampling, UnetApply, repeat_to_batch
from .sampler_object import KSamplerObject, inpainting_denoiser, sampler_object  # noqa: F401
from .samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, DenoiseFn, StepCallback, get_sampler
from .schedules import SCHEDULER_NAMES, SCHEDULERS, calculate_sigmas

# --------------------------------------------------------------------------------------------------------
# Noise, masks, sigmas
# --------------------------------------------------------------------------------------------------------

def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """ComfyUI's initial noise: float32 standard normal from a CPU generator seeded with ``seed``.

    With ``batch_index`` (a latent batch carved out of a larger one), item i gets the noise the full batch
    would have given index ``batch_index[i]``: noises are drawn one item at a time up to the largest index.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(latent.size(), dtype=torch.float32, layout=latent.layout, generator=generator,
                           device="cpu")
    wanted = sorted(set(int(i) for i in batch_index))
    item_shape = [1] + list(latent.size())[1:]
    drawn = {}
    for index in range(wanted[-1] + 1):
        noise = torch.randn(item_shape, dtype=torch.float32, layout=latent.layout, generator=generator,
                            device="cpu")
        if index in wanted:
            drawn[index] = noise
    return torch.cat([drawn[int(i)] for i in batch_index], dim=0)


def prepare_noise_mask(noise_mask: torch.Tensor, shape: Sequence[int], device=None) -> torch.Tensor:
    """Resize a [H, W] / [B, H, W] / [B, 1, H, W] inpainting mask to the latent's shape (bilinear, per channel)."""
    mask = torch.as_tensor(noise_mask, dtype=torch.float32)
    mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < shape[1]:
        mask = mask.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    mask = repeat_to_batch(mask, shape[0])
    return mask.to(device) if device is not None else mask


def scheduler_from_packs(scheduler: str):
    """The sigma function of a scheduler a pack added the way ComfyUI lets it (efficiency-nodes' "AYS SD1"): the
    name appended to comfy.samplers.KSampler.SCHEDULERS and comfy.samplers.calculate_sigmas replaced; else None."""
    module = sys.modules.get("comfy.samplers")
    if module is None or scheduler not in getattr(getattr(module, "KSampler", None), "SCHEDULERS", ()):
        return None
    function = getattr(module, "calculate_sigmas", None)
    return None if function is None or function is getattr(module, "OWN_CALCULATE_SIGMAS", None) else function


def check_names(sampler_name: str, scheduler: str) -> None:
    get_sampler(sampler_name)
    if scheduler not in SCHEDULERS and scheduler_from_packs(scheduler) is None:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULER_NAMES}")


def compute_sigmas(model_sampling, scheduler: str, sampler_name: str, steps: int,
                   denoise: Optional[float] = 1.0) -> torch.Tensor:
    """KSampler's noise levels: the scheduler's, minus the next-to-last level for samplers that waste it,
    and for ``denoise`` < 1 the last steps+1 levels of a schedule for int(steps / denoise) steps."""
    check_names(sampler_name, scheduler)

    def full_schedule(count: int) -> torch.Tensor:
        discard_penultimate = sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        calculate = calculate_sigmas if scheduler in SCHEDULERS else scheduler_from_packs(scheduler)
        sigmas = torch.as_tensor(calculate(model_sampling, scheduler, count + 1 if discard_penultimate else count))
        if discard_penultimate:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    if denoise is None or denoise > 0.9999:
        return full_schedule(steps)
    if denoise <= 0.0:
        return torch.zeros([0])
    return full_schedule(int(steps / denoise))[-(steps + 1):]


def slice_sigmas(sigmas: torch.Tensor, start_step: Optional[int] = None, last_step: Optional[int] = None,
                 force_full_denoise: bool = False) -> Optional[torch.Tensor]:
    """KSamplerAdvanced's window.  Ending early keeps the remaining noise unless ``force_full_denoise`` makes
    the last level 0.  Returns None when ``start_step`` leaves nothing to do (the latent passes through)."""
    sigmas = sigmas.clone()
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1]
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


# --------------------------------------------------------------------------------------------------------
# Running a sampler
# --------------------------------------------------------------------------------------------------------

def run_sampler(denoise_fn: DenoiseFn, model_sampling: ModelSampling, sampler_name, noise: torch.Tensor,
                latent_image: torch.Tensor, sigmas: torch.Tensor, *, seed: Optional[int] = None,
                denoise_mask: Optional[torch.Tensor] = None, callback: Optional[StepCallback] = None,
                sampler_options: Optional[dict] = None) -> torch.Tensor:
    """Noise ``latent_image`` to ``sigmas[0]`` with ``noise`` and run the sampler along ``sigmas``.

    ``sampler_name`` is a name (with ``sampler_options``) or a SAMPLER object (KSamplerObject).
    ``denoise_mask`` (already at latent shape, 1 = regenerate) restricts the change to the masked region.
    """
    if isinstance(sampler_name, KSamplerObject):
        sampler = sampler_name
    else:
        sampler = sampler_object(sampler_name, sampler_options)
    return sampler.run(denoise_fn, model_sampling, noise, latent_image, sigmas, seed=seed,
                       denoise_mask=denoise_mask, callback=callback)


def ksampler(unet_apply: UnetApply, model_sampling: ModelSampling, latent_image: torch.Tensor, *, seed: int,
             steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
             denoise: float = 1.0, disable_noise: bool = False, start_step: Optional[int] = None,
             last_step: Optional[int] = None, force_full_denoise: bool = False,
             noise_mask: Optional[torch.Tensor] = None, batch_index: Optional[Sequence[int]] = None,
             callback: Optional[StepCallback] = None,
             process_latent_in: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             process_latent_out: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             encode_extra: Optional[Callable[[dict, torch.Size], dict]] = None,
             model_dtype: Optional[torch.dtype] = None, sampler_options: Optional[dict] = None,
             model_options: Optional[dict] = None) -> torch.Tensor:
    """ComfyUI's KSampler (common_ksampler): returns the sampled latent, in the same space as the input.

    ``process_latent_in`` / ``process_latent_out`` map between the stored latent and the model's latent space
    (e.g. multiply / divide by the VAE scale factor); like ComfyUI, an all-zero input latent is not mapped in.
    ``batch_index`` is the LATENT's "batch_index", ``noise_mask`` its "noise_mask"; ``model_options`` the
    MODEL's (its patches reach the guided denoiser).
    """
    check_names(sampler_name, scheduler)
    latent_image = latent_image.to(torch.float32)
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=torch.float32, layout=latent_image.layout, device="cpu")
    else:
        noise = prepare_noise(latent_image, seed, batch_index)
    noise = noise.to(latent_image.device)

    sigmas = compute_sigmas(model_sampling, scheduler, sampler_name, steps, denoise)
    sigmas = slice_sigmas(sigmas, start_step, last_step, force_full_denoise)
    if sigmas is None or sigmas.shape[-1] == 0:
        return latent_image

    model_latent = latent_image
    if process_latent_in is not None and torch.count_nonzero(latent_image) > 0:
        model_latent = process_latent_in(latent_image)
    denoise_mask = None
    if noise_mask is not None:
        denoise_mask = prepare_noise_mask(noise_mask, latent_image.shape, latent_image.device)

    denoiser = CFGDenoiser(unet_apply, positive, negative, cfg, model_sampling=model_sampling,
                           encode_extra=encode_extra, model_dtype=model_dtype, model_options=model_options)
    denoiser.begin_sampling(model_latent, denoise_mask, seed)
    try:
        samples = run_sampler(denoiser, model_sampling, sampler_name, noise, model_latent, sigmas, seed=seed,
                              denoise_mask=denoise_mask, callback=callback, sampler_options=sampler_options)
    finally:
        denoiser.end_sampling()
    samples = samples.to(torch.float32)
    if process_latent_out is not None:
        samples = process_latent_out(samples)
    return samples


def ksampler_advanced(unet_apply: UnetApply, model_sampling: ModelSampling, latent_image: torch.Tensor, *,
                      noise_seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive,
                      negative, add_noise: bool = True, start_at_step: int = 0, end_at_step: int = 10000,
                      return_with_leftover_noise: bool = False, **options) -> torch.Tensor:
    """ComfyUI's KSamplerAdvanced: full-strength schedule, run from ``start_at_step`` to ``end_at_step``."""
    return ksampler(unet_apply, model_sampling, latent_image, seed=noise_seed, steps=steps, cfg=cfg,
                    sampler_name=sampler_name, scheduler=scheduler, positive=positive, negative=negative,
                    denoise=1.0, disable_noise=not add_noise, start_step=start_at_step, last_step=end_at_step,
                    force_full_denoise=not return_with_leftover_noise, **options)
