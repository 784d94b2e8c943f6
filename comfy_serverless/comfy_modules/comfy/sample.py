"""ComfyUI's `comfy.sample` for custom node packs: initial noise and sampling with a MODEL from this server's
loaders (comfy_serverless.sampling does the work)."""

from __future__ import annotations

import numpy as np  # noqa: F401  (ComfyUI's module imports it; packs do `from comfy.sample import np`)

from comfy_serverless.catalog.comfy_modules import missing_attribute


def prepare_noise(latent_image, seed: int, noise_inds=None):
    """ComfyUI's initial noise for a latent batch (CPU generator seeded with seed); with noise_inds (a LATENT's
    batch_index), each item gets the noise it would have had in the full batch."""
    from comfy_serverless.sampling.ksampler import prepare_noise as ours

    return ours(latent_image, seed, noise_inds)


def fix_empty_latent_channels(model, latent_image):
    """An all-zero latent with another channel count than the model's gets the model's (SD: 4)."""
    import torch

    from comfy.utils import repeat_to_batch_size

    channels = getattr(model, "latent_channels", 4)
    if latent_image.shape[1] != channels and torch.count_nonzero(latent_image) == 0:
        latent_image = repeat_to_batch_size(latent_image, channels, dim=1)
    return latent_image


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None,
           sigmas=None, callback=None, disable_pbar=False, seed=None):
    """Samples latent_image (noised with `noise`) and returns the result in the latent's own space."""
    from comfy.samplers import KSampler

    sampler = KSampler(model, steps=steps, sampler=sampler_name, scheduler=scheduler, denoise=denoise)
    return sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent_image, start_step=start_step,
                          last_step=last_step, force_full_denoise=force_full_denoise, denoise_mask=noise_mask,
                          sigmas=sigmas, callback=callback, disable_pbar=disable_pbar, seed=seed)


def sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask=None,
                  callback=None, disable_pbar=False, seed=None):
    """Samples with a SAMPLER along SIGMAS (what SamplerCustom does); returns the latent in its own space."""
    from comfy.samplers import sample as run

    return run(model, noise, positive, negative, cfg, None, sampler, sigmas, model_options=model.model_options,
               latent_image=latent_image, denoise_mask=noise_mask, callback=callback, disable_pbar=disable_pbar,
               seed=seed)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
