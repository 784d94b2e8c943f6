"""Stochastic exponential solvers: ER-SDE (Cui et al. 2023, arXiv:2309.06169), SEEDS-2/3 (Gonzalez et al. 2023,
arXiv:2305.14267) and SA-Solver (Xue et al. 2023, arXiv:2309.05019), in data prediction for Stable Diffusion's
variance-exploding scale (alpha = 1, lambda = -log sigma).  With no noise (eta = 0 / tau = 0) each reduces to a
deterministic ODE solver of the same order, which is how the tests check them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .sampler_common import DenoiseFn, per_item, report

ER_SDE_INTEGRATION_POINTS = 200


def er_sde_default_noise_scaler(x):
    """The ER-SDE paper's noise-scale function of lambda (here sigma): x (e^(x^0.3) + 10)."""
    return x * ((x ** 0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, s_noise=1.0,
                  noise_scaler: Optional[Callable] = None, max_stage=3):
    """ER-SDE-Solver, up to third stage: exact linear part for the SDE whose noise scale follows
    ``noise_scaler``, with first and second divided differences of the x_0 estimates integrated numerically."""
    scaler = er_sde_default_noise_scaler if noise_scaler is None else noise_scaler
    total = len(sigmas) - 1
    points = torch.arange(0, ER_SDE_INTEGRATION_POINTS, dtype=torch.float32, device=x.device)
    old_denoised = old_difference = None
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            r = scaler(sigma_next) / scaler(sigma)
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = sigma_next - sigma
                step = -dt / ER_SDE_INTEGRATION_POINTS
                positions = sigma_next + points * step
                scaled = scaler(positions)
                integral_1 = torch.sum(1 / scaled) * step
                difference = (denoised - old_denoised) / (sigma - sigmas[i - 1])
                x = x + (dt + integral_1 * scaler(sigma_next)) * difference
                if stage >= 3:
                    integral_2 = torch.sum((positions - sigma) / scaled) * step
                    second = (difference - old_difference) / ((sigma - sigmas[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + integral_2 * scaler(sigma_next)) * second
                old_difference = difference
            if s_noise > 0:
                noise_std = (sigma_next ** 2 - sigma ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + noise_sampler(sigma, sigma_next) * s_noise * noise_std
        old_denoised = denoised
        report(callback, i, x, denoised, total)
    return x


def _h_phi_1(h):
    return torch.expm1(h)


def _h_phi_2(h):
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_seeds_2(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                   r=0.5, solver_type="phi_1"):
    """SEEDS-2: two stages per step (the second at fraction ``r`` in lambda); the noise of the two sub-intervals
    is correlated as the exact SDE solution requires."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    inject = eta > 0 and s_noise > 0
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, per_item(sigma, x))
        if sigma_next == 0:
            x = denoised
            report(callback, i, x, denoised, total)
            continue
        lam, lam_next = -sigma.log(), -sigma_next.log()
        h = lam_next - lam
        h_eta = h * (eta + 1)
        sigma_1 = (-torch.lerp(lam, lam_next, r)).exp()
        x_1 = sigma_1 / sigma * (-r * h * eta).exp() * x - _h_phi_1(-r * h_eta) * denoised
        if inject:
            noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigma, sigma_1)
            x_1 = x_1 + noise * sigma_1 * s_noise
        denoised_1 = denoise_fn(x_1, per_item(sigma_1, x))
        if solver_type == "phi_1":
            blended = torch.lerp(denoised, denoised_1, 1 / (2 * r))
            x = sigma_next / sigma * (-h * eta).exp() * x - _h_phi_1(-h_eta) * blended
        else:
            b2 = _h_phi_2(-h_eta) / r
            b1 = _h_phi_1(-h_eta) - b2
            x = sigma_next / sigma * (-h * eta).exp() * x - (b1 * denoised + b2 * denoised_1)
        if inject:
            decay = (r - 1) * h * eta
            noise = noise * decay.exp() + (2 * decay).expm1().neg().sqrt() * noise_sampler(sigma_1, sigma_next)
            x = x + noise * sigma_next * s_noise
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_seeds_3(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                   r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3: three stages per step at fractions r_1, r_2 of the step in lambda."""
    inject = eta > 0 and s_noise > 0
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, per_item(sigma, x))
        if sigma_next == 0:
            x = denoised
            report(callback, i, x, denoised, total)
            continue
        lam, lam_next = -sigma.log(), -sigma_next.log()
        h = lam_next - lam
        h_eta = h * (eta + 1)
        sigma_1 = (-torch.lerp(lam, lam_next, r_1)).exp()
        sigma_2 = (-torch.lerp(lam, lam_next, r_2)).exp()
        x_1 = sigma_1 / sigma * (-r_1 * h * eta).exp() * x - _h_phi_1(-r_1 * h_eta) * denoised
        if inject:
            noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigma, sigma_1)
            x_1 = x_1 + noise * sigma_1 * s_noise
        denoised_1 = denoise_fn(x_1, per_item(sigma_1, x))
        a2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a1 = _h_phi_1(-r_2 * h_eta) - a2
        x_2 = sigma_2 / sigma * (-r_2 * h * eta).exp() * x - (a1 * denoised + a2 * denoised_1)
        if inject:
            decay = (r_1 - r_2) * h * eta
            noise = noise * decay.exp() + (2 * decay).expm1().neg().sqrt() * noise_sampler(sigma_1, sigma_2)
            x_2 = x_2 + noise * sigma_2 * s_noise
        denoised_2 = denoise_fn(x_2, per_item(sigma_2, x))
        b3 = _h_phi_2(-h_eta) / r_2
        b1 = _h_phi_1(-h_eta) - b3
        x = sigma_next / sigma * (-h * eta).exp() * x - (b1 * denoised + b3 * denoised_2)
        if inject:
            decay = (r_2 - 1) * h * eta
            noise = noise * decay.exp() + (2 * decay).expm1().neg().sqrt() * noise_sampler(sigma_2, sigma_next)
            x = x + noise * sigma_next * s_noise
        report(callback, i, x, denoised, total)
    return x


# ---------------------------------------------------------------------------------------------------------
# SA-Solver
# ---------------------------------------------------------------------------------------------------------

def tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable:
    """SA-Solver's stochasticity: tau = eta while start_sigma >= sigma >= end_sigma, else 0 (an ODE step)."""

    def tau(sigma) -> float:
        if eta <= 0:
            return 0.0
        return eta if start_sigma >= float(sigma) >= end_sigma else 0.0

    return tau


def stochastic_adams_coefficients(nodes: list[float], lam_start: float, lam_end: float, tau: float,
                                  simple_order_2: bool = False, corrector: bool = False) -> list[float]:
    """Weights b_j of the x_0 estimates at lambda ``nodes`` (oldest first) for a step lam_start -> lam_end:
    b_j = integral of (1 + tau²) e^((1 + tau²)(lambda - lam_end)) L_j(lambda), L_j the Lagrange basis."""
    import numpy as np

    k = 1 + tau ** 2
    h = lam_end - lam_start
    if simple_order_2 and len(nodes) == 2:  # the paper's simplified order-2 weights (its appendix D)
        full = -math.expm1(-h * k)
        if corrector:
            newest = 0.5 * k * h
            return [full - newest, newest]
        older = 0.5 * k * h ** 2 / (nodes[-2] - lam_start)
        return [older, full - older]
    points, weights = np.polynomial.legendre.leggauss(32)
    lam = lam_start + h * (points + 1) / 2
    kernel = k * np.exp(k * (lam - lam_end)) * weights * h / 2
    result = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(lam)
        for m, other in enumerate(nodes):
            if m != j:
                basis *= (lam - other) / (node - other)
        result.append(float(np.sum(kernel * basis)))
    return result


@torch.no_grad()
def sample_sa_solver(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, tau_func=None,
                     s_noise=1.0, predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False,
                     model_sampling=None):
    """SA-Solver: stochastic Adams predictor (order ``predictor_order``) and corrector (``corrector_order``),
    lower orders near a final sigma of 0; PECE re-evaluates the model at the corrected point.  Without
    ``tau_func`` the SDE runs (tau 1) from 20% to 80% of the model's schedule, ODE elsewhere."""
    if len(sigmas) <= 1:
        return x
    if tau_func is None:
        if model_sampling is None:  # Stable Diffusion's noise table
            from .schedules import DiscreteSchedule

            model_sampling = DiscreteSchedule()
        tau_func = tau_interval(model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.8))
    levels = [float(s) for s in sigmas]
    lambdas = [-math.log(s) if s > 0 else math.inf for s in levels]
    total = len(levels) - 1
    history: list[torch.Tensor] = []
    keep = max(predictor_order, corrector_order)
    lower_order_to_end = levels[-1] == 0
    x_pred, h, tau, noise = x, 0.0, 0.0, None
    for i in range(total):
        denoised = denoise_fn(x_pred, per_item(sigmas[i], x))
        history = (history + [denoised])[-keep:]
        p_order = min(predictor_order, len(history))
        c_order = 0 if i == 0 or (levels[i + 1] == 0 and not use_pece) else min(corrector_order, len(history))
        if lower_order_to_end:
            p_order = min(p_order, total - 1 - i)
            c_order = min(c_order, total - i)
        if c_order == 0:
            x = x_pred
        else:
            b = stochastic_adams_coefficients(lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau,
                                              simple_order_2, corrector=True)
            x = levels[i] / levels[i - 1] * math.exp(-(tau ** 2) * h) * x + sum(
                w * d for w, d in zip(b, history[-c_order:]))
            if noise is not None:
                x = x + noise
            if use_pece:
                denoised = denoise_fn(x, per_item(sigmas[i], x))
                history[-1] = denoised
        if levels[i + 1] == 0:
            x_pred = denoised
        else:
            tau = float(tau_func(sigmas[i + 1]))
            b = stochastic_adams_coefficients(lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau,
                                              simple_order_2, corrector=False)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = levels[i + 1] / levels[i] * math.exp(-(tau ** 2) * h) * x + sum(
                w * d for w, d in zip(b, history[-p_order:]))
            noise = None
            if tau > 0 and s_noise > 0:
                scale = levels[i + 1] * math.sqrt(-math.expm1(-2 * tau ** 2 * h)) * s_noise
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * scale
                x_pred = x_pred + noise
        report(callback, i, x_pred, denoised, total)
    return x_pred
