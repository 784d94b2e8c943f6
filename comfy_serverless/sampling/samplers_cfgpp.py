"""CFG++ samplers (Chung et al. 2024, arXiv:2406.08070): the guided x_0 estimate is kept, but the step back up to
the next noise level uses the *unguided* (negative-prompt) prediction's noise, which keeps the trajectory on the
data manifold at low guidance scales.  The unguided prediction comes from the guider's post-CFG hook
(:class:`.sampler_common.UncondCapture`).  RES multistep and gradient estimation take ``cfg_pp=True`` in
:mod:`.samplers_multistep`.
"""

from __future__ import annotations

import torch

from .sampler_common import DenoiseFn, UncondCapture, ancestral_step, ode_slope, per_item, report


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                                  eta=1.0, s_noise=1.0):
    """x_next = D_guided + sigma_down * (x - D_uncond) / sigma, plus ancestral noise of std sigma_up."""
    model = UncondCapture(denoise_fn)
    total = len(sigmas) - 1
    for i in range(total):
        denoised = model(x, per_item(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
            x = denoised + sigma_down * ode_slope(x, sigmas[i], model.uncond)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_euler_cfg_pp(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """Deterministic CFG++ Euler (eta 0)."""
    return sample_euler_ancestral_cfg_pp(denoise_fn, x, sigmas, noise_sampler=noise_sampler, callback=callback,
                                         eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_euler_cfg_pp_alternative(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """SamplerEulerCFGpp's "alternative" version: a plain Euler step with the slope
    d = (x - 2 D_guided + D_uncond) / sigma (the guided slope plus the guidance over sigma)."""
    model = UncondCapture(denoise_fn)
    total = len(sigmas) - 1
    for i in range(total):
        denoised = model(x, per_item(sigmas[i], x))
        slope = ode_slope(x - denoised + model.uncond, sigmas[i], denoised)
        x = x + slope * (sigmas[i + 1] - sigmas[i])
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                                     eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) ancestral, both stages on the unguided estimates; the guidance (D - D_uncond) of the
    first stage is added after the step."""
    model = UncondCapture(denoise_fn)
    total = len(sigmas) - 1
    for i in range(total):
        denoised = model(x, per_item(sigmas[i], x))
        uncond = model.uncond
        guidance = denoised - uncond
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + ode_slope(x, sigmas[i], uncond) * (sigma_down - sigmas[i])
        else:
            lam, lam_down = -sigmas[i].log(), -torch.as_tensor(sigma_down).log()
            h = lam_down - lam
            sigma_mid = (-(lam + h / 2)).exp()
            x_mid = (sigma_mid / sigmas[i]) * x - (-h / 2).expm1() * uncond
            model(x_mid, per_item(sigma_mid, x))
            x = (sigma_down / sigmas[i]) * x - (-h).expm1() * model.uncond
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """DPM-Solver++(2M) with CFG++: the linear part uses the unguided estimate, the second-order correction the
    difference between the guided estimate and the previous unguided one."""
    model = UncondCapture(denoise_fn)
    total = len(sigmas) - 1
    previous_uncond = None
    for i in range(total):
        denoised = model(x, per_item(sigmas[i], x))
        uncond = model.uncond
        h = sigmas[i].log() - sigmas[i + 1].log()
        decay = torch.exp(-h)
        if previous_uncond is None or sigmas[i + 1] == 0:
            mix = -decay * uncond
        else:
            ratio = (sigmas[i - 1].log() - sigmas[i].log()) / h
            mix = -decay * uncond - torch.expm1(-h) * (1 / (2 * ratio)) * (denoised - previous_uncond)
        x = denoised + mix + decay * x
        previous_uncond = uncond
        report(callback, i, x, denoised, total)
    return x
