"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) in its noise-prediction form: ``dpm_fast`` (fixed steps, orders
3-3-...-2-1 spending exactly the given number of model evaluations) and ``dpm_adaptive`` (embedded 1/2 or 2/3
pairs with a PID step-size controller).

Both integrate in t = -log sigma from the schedule's first level down to its smallest non-zero level; the levels
in between are not used (ComfyUI's behaviour: only the range and, for dpm_fast, the step count matter).
"""

from __future__ import annotations

import math

import torch

from .sampler_common import DenoiseFn, ancestral_step, per_item, report


def _sigma(t):
    return t.neg().exp()


def _time(sigma):
    return torch.as_tensor(sigma).log().neg()


class _Solver:
    """The DPM-Solver-1/2/3 single steps; eps values of one step are cached by stage name."""

    def __init__(self, denoise_fn: DenoiseFn):
        self.denoise_fn = denoise_fn
        self.evaluations = 0

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            sigma = _sigma(t)
            self.evaluations += 1
            cache[key] = (x - self.denoise_fn(x, per_item(sigma, x))) / sigma
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - _sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
              - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
        eps_2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _range(sigmas):
    """(sigma_max, sigma_min) as ComfyUI takes them: the first level and the last non-zero one."""
    low = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
    if low <= 0 or sigmas[0] <= 0:
        raise ValueError("dpm_fast / dpm_adaptive need non-zero first and last noise levels")
    return sigmas[0].float().cpu(), low.float().cpu()


def _noisy_target(t, t_next, t_end, eta):
    """With eta > 0, the deterministic part stops at the ancestral sigma_down (not beyond t_end); returns that
    time and the std of the noise that brings it back to t_next's level."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = torch.minimum(t_end, _time(sigma_down))
    return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, eta=0.0, s_noise=1.0):
    """DPM-Solver-fast: len(sigmas) - 1 model evaluations, steps equally spaced in t."""
    if len(sigmas) <= 1:
        return x
    sigma_max, sigma_min = _range(sigmas)
    evaluations = len(sigmas) - 1
    t_start, t_end = _time(sigma_max), _time(sigma_min)
    steps = evaluations // 3 + 1
    times = torch.linspace(float(t_start), float(t_end), steps + 1)
    orders = [3] * (steps - 2) + [2, 1] if evaluations % 3 == 0 else [3] * (steps - 1) + [evaluations % 3]
    solver = _Solver(denoise_fn)
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = times[i], times[i + 1]
        t_target, noise_std = _noisy_target(t, t_next, t_end, eta)
        denoised = x - _sigma(t) * solver.eps(cache, "eps", x, t)
        x = (solver.step_1, solver.step_2, solver.step_3)[order - 1](x, t, t_target, cache)
        if noise_std:
            x = x + noise_std * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
        report(callback, sum(orders[:i + 1]) - 1, x, denoised, evaluations)  # progress in model evaluations
    return x


class PIDStepSizeController:
    """Proportional-integral-derivative control of the step h from the error estimates of the last three
    steps; a step is accepted when the proposed growth factor reaches ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors: list[float] = []

    def propose_step(self, error) -> bool:
        inverse = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        e0, e1, e2 = self.inverse_errors
        factor = 1 + math.atan(e0 ** self.b1 * e1 ** self.b2 * e2 ** self.b3 - 1)  # soft limiter
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors = [e0, e0, e1]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12 / -23 with adaptive steps: the lower-order result estimates the error of the higher one."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    if len(sigmas) <= 1:
        return x
    sigma_max, sigma_min = _range(sigmas)
    t_start, t_end = _time(sigma_max), _time(sigma_min)
    atol, rtol = torch.tensor(float(atol)), torch.tensor(float(rtol))
    solver = _Solver(denoise_fn)
    controller = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    total = len(sigmas) - 1
    s, x_previous, steps = t_start, x, 0
    while s < t_end - 1e-5:
        cache: dict = {}
        t = torch.minimum(t_end, s + controller.h)
        t_target, noise_std = _noisy_target(s, t, t_end, eta)
        denoised = x - _sigma(s) * solver.eps(cache, "eps", x, s)
        if order == 2:
            x_low = solver.step_1(x, s, t_target, cache)
            x_high = solver.step_2(x, s, t_target, cache)
        else:
            x_low = solver.step_2(x, s, t_target, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_target, cache)
        tolerance = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_previous.abs()))
        error = torch.linalg.norm((x_low - x_high) / tolerance) / x.numel() ** 0.5
        if controller.propose_step(error):
            x_previous = x_low
            x = x_high
            if noise_std:
                x = x + noise_std * s_noise * noise_sampler(_sigma(s), _sigma(t))
            s = t
        report(callback, min(steps, total - 1), x, denoised, total)
        steps += 1
    return x
