"""Samplers that reuse earlier model evaluations or extra stages: Heun++, iPNDM (fixed and variable step), DEIS,
RES multistep, gradient estimation, and LCM with upscaling in between steps.

All work in the variance-exploding scale of Stable Diffusion (x = x_0 + sigma * eps), where the ODE slope is
d = (x - D(x)) / sigma; signatures and noise conventions are those of :mod:`.sampler_common`.
"""

from __future__ import annotations

import math

import torch

from .sampler_common import (
    DenoiseFn,
    UncondCapture,
    ancestral_step,
    churned_sigma,
    ode_slope,
    per_item,
    report,
)


@torch.no_grad()
def sample_heunpp2(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                   s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun++ (three stages): the slope is a weighted mean of the slopes at sigma, sigma_next and the level
    after, weights growing with those levels relative to the first one; Heun before the last step, Euler last."""
    total = len(sigmas) - 1
    final_level = sigmas[-1]
    for i in range(total):
        x, sigma_hat = churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, per_item(sigma_hat, x))
        slope = ode_slope(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == final_level:
            x = x + slope * dt
        else:
            x_2 = x + slope * dt
            slope_2 = ode_slope(x_2, sigmas[i + 1], denoise_fn(x_2, per_item(sigmas[i + 1], x)))
            if sigmas[i + 2] == final_level:
                w2 = sigmas[i + 1] / (2 * sigmas[0])
                x = x + (slope * (1 - w2) + slope_2 * w2) * dt
            else:
                x_3 = x_2 + slope_2 * (sigmas[i + 2] - sigmas[i + 1])
                slope_3 = ode_slope(x_3, sigmas[i + 2], denoise_fn(x_3, per_item(sigmas[i + 2], x)))
                w2 = sigmas[i + 1] / (3 * sigmas[0])
                w3 = sigmas[i + 2] / (3 * sigmas[0])
                x = x + ((1 - w2 - w3) * slope + w2 * slope_2 + w3 * slope_3) * dt
        report(callback, i, x, denoised, total)
    return x


# Adams–Bashforth weights for equal steps, newest slope first (orders 1 to 4).
_ADAMS_BASHFORTH = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _variable_step_weights(order: int, sigmas, i: int) -> list[float]:
    """iPNDM-v's weights (Zhang & Chen 2023, variable step sizes), newest slope first."""
    h = [float(sigmas[i + 1] - sigmas[i])] + [float(sigmas[i - k] - sigmas[i - k - 1]) for k in range(order - 1)]
    if order == 1:
        return [1.0]
    base = [(2 + h[0] / h[1]) / 2, -(h[0] / h[1]) / 2]
    if order == 2:
        return base
    t1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
    if order == 3:
        return [base[0] + t1, base[1] - (1 + h[1] / h[2]) * t1, t1 * h[1] / h[2]]
    ratio = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    t2 = (((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * (h[0] + h[1] + h[2])))
          * (h[0] * (h[0] + h[1]) * (h[0] + h[1] + h[2])) / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])))
    return [base[0] + t1 + t2,
            base[1] - (1 + h[1] / h[2]) * t1 - (1 + h[1] / h[2] + ratio) * t2,
            t1 * h[1] / h[2] + (h[1] / h[2] + ratio * (1 + h[2] / h[3])) * t2,
            -t2 * ratio * h[1] / h[2]]


def _pndm(denoise_fn, x, sigmas, noise_sampler, callback, max_order, variable):
    total = len(sigmas) - 1
    slopes: list[torch.Tensor] = []  # newest first
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        slopes.insert(0, ode_slope(x, sigmas[i], denoised))
        del slopes[max_order:]
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            weights = _variable_step_weights(order, sigmas, i) if variable else _ADAMS_BASHFORTH[order]
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(w * s for w, s in zip(weights, slopes))
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_ipndm(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, max_order=4):
    """Improved PNDM: Adams–Bashforth in sigma with the equal-step weights, order rising to ``max_order``."""
    return _pndm(denoise_fn, x, sigmas, noise_sampler, callback, max_order, variable=False)


@torch.no_grad()
def sample_ipndm_v(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, max_order=4):
    """iPNDM with weights for the actual (unequal) step sizes."""
    return _pndm(denoise_fn, x, sigmas, noise_sampler, callback, max_order, variable=True)


# DEIS ("tab" mode) puts the steps on a VP-SDE clock t fitted to EDM's noise range, sigma(t)^2 + 1 =
# exp(beta_d t^2 / 2 + beta_min t) with sigma(EPS_T) = SIGMA_LOW and sigma(1) = SIGMA_HIGH.
DEIS_EPS_T, DEIS_SIGMA_LOW, DEIS_SIGMA_HIGH = 1e-3, 0.002, 80.0
_GAUSS_POINTS = 48


def _deis_clock():
    high = math.log(DEIS_SIGMA_HIGH ** 2 + 1)
    beta_d = 2 * (math.log(DEIS_SIGMA_LOW ** 2 + 1) / DEIS_EPS_T - high) / (DEIS_EPS_T - 1)
    return beta_d, high - 0.5 * beta_d


def _deis_time(sigma: float, beta_d: float, beta_min: float) -> float:
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(sigma ** 2 + 1)) - beta_min) / beta_d


def deis_coefficients(sigmas, max_order: int) -> list[list[float]]:
    """Per step, the weights of the newest ``order`` slopes: the integral over the step of each Lagrange basis
    polynomial (nodes: the VP times of those slopes' levels) against d sigma = sigma'(t) dt."""
    import numpy as np

    beta_d, beta_min = _deis_clock()
    times = [_deis_time(float(s), beta_d, beta_min) for s in sigmas]
    nodes, gauss_weights = np.polynomial.legendre.leggauss(_GAUSS_POINTS)
    result = []
    for i in range(len(times) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            result.append([])
            continue
        start, end = times[i], times[i + 1]
        taus = start + (end - start) * (nodes + 1) / 2
        exponent = 0.5 * beta_d * taus ** 2 + beta_min * taus
        sigma_tau = np.sqrt(np.expm1(exponent))
        dsigma = np.exp(exponent) * (beta_d * taus + beta_min) / (2 * sigma_tau)
        previous = [times[i - k] for k in range(order)]
        row = []
        for j in range(order):
            basis = np.ones_like(taus)
            for k in range(order):
                if k != j:
                    basis *= (taus - previous[k]) / (previous[j] - previous[k])
            row.append(float(np.sum(gauss_weights * basis * dsigma) * (end - start) / 2))
        result.append(row)
    return result


@torch.no_grad()
def sample_deis(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, max_order=3):
    """DEIS (Zhang & Chen 2023), tabulated variant: multistep on the slope with weights from integrating the
    slopes' interpolation polynomial in VP time; Euler for the first step and the step to sigma 0."""
    total = len(sigmas) - 1
    coefficients = deis_coefficients(sigmas, max_order)
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        slopes.insert(0, ode_slope(x, sigmas[i], denoised))
        del slopes[max_order:]
        order = 1 if sigmas[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x = x + (sigmas[i + 1] - sigmas[i]) * slopes[0]
        else:
            x = x + sum(c * s for c, s in zip(coefficients[i], slopes))
        report(callback, i, x, denoised, total)
    return x


def _phi_1(t):
    return torch.expm1(t) / t


def _phi_2(t):
    return (_phi_1(t) - 1.0) / t


@torch.no_grad()
def sample_res_multistep(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, s_noise=1.0,
                         eta=0.0, cfg_pp=False):
    """RES second-order multistep (Zhang et al. 2023, arXiv:2308.02157) in lambda = -log sigma, with optional
    ancestral noise (``eta``) and CFG++ (step along the unguided prediction, guidance added back)."""
    model = UncondCapture(denoise_fn) if cfg_pp else denoise_fn
    total = len(sigmas) - 1
    previous_denoised = previous_sigma_down = None
    for i in range(total):
        denoised = model(x, per_item(sigmas[i], x))
        uncond = model.uncond if cfg_pp else None
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0 or previous_denoised is None:
            if cfg_pp:
                x = denoised + ode_slope(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + ode_slope(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = -sigmas[i].log(), -torch.as_tensor(sigma_down).log()
            lam_old, lam_prev = -torch.as_tensor(previous_sigma_down).log(), -sigmas[i - 1].log()
            h = lam_next - lam
            c2 = (lam_prev - lam_old) / h
            b1 = torch.nan_to_num(_phi_1(-h) - _phi_2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(_phi_2(-h) / c2, nan=0.0)
            current = denoised
            if cfg_pp:
                x = x + (denoised - uncond)
                current = uncond
            x = (-h).exp() * x + h * (b1 * current + b2 * previous_denoised)
        if sigmas[i + 1] > 0 and sigma_up:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        previous_denoised = uncond if cfg_pp else denoised
        previous_sigma_down = sigma_down
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_gradient_estimation(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                               ge_gamma=2.0, cfg_pp=False):
    """Euler with the slope extrapolated from the previous one (Permenter & Yuan, "Interpreting and improving
    diffusion models from an optimization perspective"): d + (gamma - 1)(d - d_previous)."""
    model = UncondCapture(denoise_fn) if cfg_pp else denoise_fn
    total = len(sigmas) - 1
    previous_slope = None
    for i in range(total):
        denoised = model(x, per_item(sigmas[i], x))
        slope = ode_slope(x, sigmas[i], model.uncond if cfg_pp else denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + slope * sigmas[i + 1] if cfg_pp else x + slope * dt
            if previous_slope is not None:
                x = x + (ge_gamma - 1) * (slope - previous_slope) * dt
        previous_slope = slope
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_lcm_upscale(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                       total_upscale=2.0, upscale_method="bislerp", upscale_steps=None):
    """LCM sampling that enlarges the latent between steps, up to ``total_upscale`` times the size after
    ``upscale_steps`` steps (default: about half the steps).  The re-noising after an enlargement draws from
    torch's global generator, as ComfyUI does (the latent no longer has the size the seeded noise was for)."""
    from ..nodes.latents import upscale_latent

    total = len(sigmas) - 1
    if upscale_steps is None:
        upscale_steps = max(len(sigmas) // 2 + 1, 2)
    else:
        upscale_steps = min(upscale_steps + 1, len(sigmas) + 1)
    factors = torch.linspace(1.0, float(total_upscale), upscale_steps, dtype=torch.float64)[1:].tolist()
    height, width = x.shape[-2], x.shape[-1]
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        x = denoised
        if i < len(factors):
            x = upscale_latent(x, round(width * factors[i]), round(height * factors[i]), upscale_method, "disabled")
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * torch.randn_like(x)
        report(callback, i, x, denoised, total)
    return x
