"""The classic k-diffusion samplers under ComfyUI's names: Euler (+ancestral), Heun, DPM-2 (+ancestral), LMS,
DPM-Solver++ (2S ancestral, SDE, 2M, 2M SDE, 3M SDE), DDPM and LCM.

Each integrates the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (or a reverse SDE) of
x_sigma = x_0 + sigma * eps from ``sigmas[0]`` to ``sigmas[-1]``; the DPM-Solver++ family works in
lambda = -log sigma, where the ODE of the data prediction is semi-linear.  Signatures, noise samplers and
progress reports: see :mod:`.sampler_common`.
"""

from __future__ import annotations

import torch

from .sampler_common import (
    DenoiseFn,
    ancestral_step,
    churned_sigma,
    ode_slope,
    per_item,
    report,
)


@torch.no_grad()
def sample_euler(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the correction)."""
    total = len(sigmas) - 1
    for i in range(total):
        x, sigma_hat = churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, per_item(sigma_hat, x))
        x = x + ode_slope(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                           eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise back up to the next noise level."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + ode_slope(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_heun(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the final step to 0 is plain Euler."""
    total = len(sigmas) - 1
    for i in range(total):
        x, sigma_hat = churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, per_item(sigma_hat, x))
        slope = ode_slope(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + slope * dt
        else:
            x_predicted = x + slope * dt
            denoised_next = denoise_fn(x_predicted, per_item(sigmas[i + 1], x))
            slope_next = ode_slope(x_predicted, sigmas[i + 1], denoised_next)
            x = x + (slope + slope_next) / 2 * dt
        report(callback, i, x, denoised, total)
    return x


def _geometric_midpoint(sigma_a, sigma_b):
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


@torch.no_grad()
def sample_dpm_2(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Second-order midpoint method, midpoint taken halfway in log-sigma (DPM-Solver-2 flavour)."""
    total = len(sigmas) - 1
    for i in range(total):
        x, sigma_hat = churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, per_item(sigma_hat, x))
        slope = ode_slope(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + slope * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = _geometric_midpoint(sigma_hat, sigmas[i + 1])
            x_mid = x + slope * (sigma_mid - sigma_hat)
            slope_mid = ode_slope(x_mid, sigma_mid, denoise_fn(x_mid, per_item(sigma_mid, x)))
            x = x + slope_mid * (sigmas[i + 1] - sigma_hat)
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                           eta=1.0, s_noise=1.0):
    """dpm_2 down to sigma_down, then fresh noise up to the next level."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        slope = ode_slope(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + slope * (sigma_down - sigmas[i])
        else:
            sigma_mid = _geometric_midpoint(sigmas[i], sigma_down)
            x_mid = x + slope * (sigma_mid - sigmas[i])
            slope_mid = ode_slope(x_mid, sigma_mid, denoise_fn(x_mid, per_item(sigma_mid, x)))
            x = x + slope_mid * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, denoised, total)
    return x


def _polynomial_times_linear(coefficients: list[float], root: float, scale: float) -> list[float]:
    """(sum c_k tau^k) * (tau - root) / scale, coefficients lowest power first."""
    product = [0.0] * (len(coefficients) + 1)
    for power, c in enumerate(coefficients):
        product[power + 1] += c / scale
        product[power] -= c * root / scale
    return product


def linear_multistep_coefficients(order: int, times: list[float], i: int) -> list[float]:
    """Adams–Bashforth weights for a step from times[i] to times[i+1] using slopes at times[i], times[i-1], ...

    Weight j is the integral over the step of the Lagrange basis polynomial that is 1 at times[i-j] and 0 at
    the other nodes; the polynomial is integrated exactly.
    """
    if order - 1 > i:
        raise ValueError(f"order {order} needs {order} previous slopes but step {i} has only {i + 1}")
    nodes = [times[i - k] for k in range(order)]
    start, end = times[i], times[i + 1]
    weights = []
    for j in range(order):
        basis = [1.0]
        for k in range(order):
            if k != j:
                basis = _polynomial_times_linear(basis, nodes[k], nodes[j] - nodes[k])
        weights.append(sum(c * (end ** (p + 1) - start ** (p + 1)) / (p + 1) for p, c in enumerate(basis)))
    return weights


@torch.no_grad()
def sample_lms(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, order=4):
    """Linear multistep (Adams–Bashforth in sigma) using up to ``order`` past slopes."""
    total = len(sigmas) - 1
    times = [float(s) for s in sigmas]
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        slopes.append(ode_slope(x, sigmas[i], denoised))
        if len(slopes) > order:
            slopes.pop(0)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            weights = linear_multistep_coefficients(min(i + 1, order), times, i)
            x = x + sum(w * s for w, s in zip(weights, reversed(slopes)))
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) (Lu et al. 2022, data prediction, single-step 2nd order) with ancestral noise."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + ode_slope(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_down = -sigmas[i].log(), -torch.as_tensor(sigma_down).log()
            h = lam_down - lam
            sigma_mid = (-(lam + h / 2)).exp()
            x_mid = (sigma_mid / sigmas[i]) * x - (-h / 2).expm1() * denoised
            denoised_mid = denoise_fn(x_mid, per_item(sigma_mid, x))
            x = (sigma_down / sigmas[i]) * x - (-h).expm1() * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ stochastic, two stages per step (an intermediate point at fraction ``r`` of the step in
    lambda).  Noise comes from ``noise_sampler`` (per-step Gaussian by default; ComfyUI uses a Brownian tree)."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = lam_next - lam
            sigma_mid = (-(lam + r * h)).exp()
            weight_mid = 1 / (2 * r)

            # stage 1: to the intermediate point (its deterministic part stops at sigma_down)
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigma_mid, eta)
            h_down = -torch.as_tensor(sigma_down).log() - lam
            x_mid = (-h_down).exp() * x - (-h_down).expm1() * denoised
            if eta > 0 and s_noise > 0:
                x_mid = x_mid + noise_sampler(sigmas[i], sigma_mid) * s_noise * sigma_up
            denoised_mid = denoise_fn(x_mid, per_item(sigma_mid, x))

            # stage 2: the full step, with the x_0 estimate extrapolated from both evaluations
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
            h_down = -torch.as_tensor(sigma_down).log() - lam
            blended = (1 - weight_mid) * denoised + weight_mid * denoised_mid
            x = (-h_down).exp() * x - (-h_down).expm1() * blended
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """DPM-Solver++(2M): multistep 2nd order, reusing the previous step's x_0 estimate."""
    total = len(sigmas) - 1
    previous_denoised = None
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = lam_next - lam
        if previous_denoised is None or sigmas[i + 1] == 0:
            estimate = denoised
        else:
            ratio = (lam - (-sigmas[i - 1].log())) / h
            estimate = (1 + 1 / (2 * ratio)) * denoised - (1 / (2 * ratio)) * previous_denoised
        # sigma_next / sigma written as exp(-h) so sigma_next = 0 (h = inf) lands exactly on the estimate
        x = (-h).exp() * x - (-h).expm1() * estimate
        previous_denoised = denoised
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022).  ``solver_type`` 'midpoint' (ComfyUI's default) or 'heun'."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    total = len(sigmas) - 1
    previous_denoised = None
    h = h_previous = None
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()  # step in lambda = -log sigma
            h_eta = h * (eta + 1)
            decay = -(-h_eta).expm1()  # 1 - e^{-h(1+eta)}
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + decay * denoised
            if previous_denoised is not None:
                ratio = h_previous / h
                difference = (denoised - previous_denoised) / ratio
                if solver_type == "heun":
                    x = x + (decay / (-h_eta) + 1) * difference
                else:
                    x = x + 0.5 * decay * difference
            if eta > 0 and s_noise > 0:
                noise_scale = sigmas[i + 1] * (-(-2 * h * eta).expm1()).sqrt() * s_noise
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * noise_scale
        previous_denoised = denoised
        h_previous = h
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep, falling back to 2nd/1st order for the first steps."""
    total = len(sigmas) - 1
    denoised_1 = denoised_2 = None  # x_0 estimates one and two steps back
    h = h_1 = h_2 = None
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - (-h_eta).expm1() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                first_0 = (denoised - denoised_1) / r0
                first_1 = (denoised_1 - denoised_2) / r1
                first = first_0 + (first_0 - first_1) * r0 / (r0 + r1)
                second = (first_0 - first_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * first - phi_3 * second
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta > 0 and s_noise > 0:
                noise_scale = sigmas[i + 1] * (-(-2 * h * eta).expm1()).sqrt() * s_noise
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * noise_scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_ddpm(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """Ancestral DDPM steps (Ho et al. 2020, eq. 11 + posterior noise), done in the variance-preserving scale."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, per_item(sigma, x))
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma ** 2)
        alpha_bar = 1 / (sigma * sigma + 1)
        alpha_bar_next = 1 / (sigma_next * sigma_next + 1)
        alpha = alpha_bar / alpha_bar_next
        x_vp = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_bar).sqrt())
        if sigma_next > 0:
            posterior_std = ((1 - alpha) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt()
            x_vp = x_vp + posterior_std * noise_sampler(sigma, sigma_next)
            x = x_vp * torch.sqrt(1.0 + sigma_next ** 2)
        else:
            x = x_vp
        report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_lcm(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """Latent Consistency Model sampling: jump to the x_0 estimate, re-noise to the next level."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, per_item(sigmas[i], x))
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
        report(callback, i, x, denoised, total)
    return x
