"""ODE/SDE samplers for diffusion models under ComfyUI's names.

Every sampler integrates the probability-flow ODE (or a reverse SDE) of a variance-exploding diffusion
x_sigma = x_0 + sigma * eps from ``sigmas[0]`` down to ``sigmas[-1]`` (usually 0), given a denoiser

    denoise_fn(x, sigma) -> estimate of x_0,

where ``sigma`` is a 1-D tensor with one noise level per batch item.  The ODE is dx/dsigma = (x - D(x)) / sigma.
The exponential-integrator solvers (DPM-Solver++, UniPC) work in lambda = -log(sigma), in which the ODE for
the data prediction is semi-linear.

Randomness: ancestral and SDE samplers draw fresh Gaussian noise through a *noise sampler*
``noise_sampler(sigma, sigma_next) -> Tensor shaped like x``.  The default, :func:`default_noise_sampler`,
reproduces ComfyUI's for the ancestral samplers (a generator seeded with seed + 1 on CPU, seed on other
devices, one ``randn`` per draw).  ComfyUI drives ``dpmpp_sde``, ``dpmpp_2m_sde`` and ``dpmpp_3m_sde`` from a
torchsde Brownian tree instead; we use the same per-step Gaussian sampler for those, so their output is
deterministic for a seed but not identical to ComfyUI's.

Progress: ``callback(step_index, x, denoised, total_steps)`` is called after each step with the updated latent
and that step's x_0 estimate; raising from it aborts sampling (how interrupts are delivered).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]

# ComfyUI computes these samplers' sigmas for one step more and drops the next-to-last level, because their
# second-order evaluation at the midpoint towards sigma_min is wasted.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc"})

# Where UniPC stops instead of sigma 0 (lambda = -log sigma must stay finite), as ComfyUI does.
UNIPC_FINAL_SIGMA = 0.001


# --------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------

def default_noise_sampler(x: torch.Tensor, seed: Optional[int] = None,
                          generator: Optional[torch.Generator] = None) -> NoiseSampler:
    """Fresh standard-normal noise shaped like ``x`` on every call.

    With ``seed``, a private generator is seeded as ComfyUI seeds it (seed + 1 on CPU, so the sampler noise
    differs from the initial latent noise drawn with ``seed``).  An explicit ``generator`` wins over ``seed``;
    with neither, torch's global generator is used.
    """
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed + 1 if x.device.type == "cpu" else seed)

    def draw(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return draw


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step from sigma_from to sigma_to into a deterministic part down to ``sigma_down`` plus fresh
    noise of std ``sigma_up`` (sigma_down² + sigma_up² = sigma_to²).  eta = 1 is the DDPM posterior variance,
    eta = 0 the deterministic (DDIM) step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _ode_slope(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def _per_item(sigma, x):
    return sigma * x.new_ones([x.shape[0]])


def _report(callback, i, x, denoised, total):
    if callback is not None:
        callback(i, x, denoised, total)


def _churned_sigma(x, sigma, total_steps, noise_sampler, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s optional "churn": raise the noise level a little by adding fresh noise."""
    if s_churn <= 0 or not (s_tmin <= sigma <= s_tmax):
        return x, sigma
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    gamma = min(s_churn / total_steps, 2 ** 0.5 - 1)
    sigma_hat = sigma * (gamma + 1)
    x = x + noise_sampler(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


# --------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the correction)."""
    total = len(sigmas) - 1
    for i in range(total):
        x, sigma_hat = _churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, _per_item(sigma_hat, x))
        x = x + _ode_slope(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                           eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise back up to the next noise level."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + _ode_slope(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_heun(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the final step to 0 is plain Euler."""
    total = len(sigmas) - 1
    for i in range(total):
        x, sigma_hat = _churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, _per_item(sigma_hat, x))
        slope = _ode_slope(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + slope * dt
        else:
            x_predicted = x + slope * dt
            denoised_next = denoise_fn(x_predicted, _per_item(sigmas[i + 1], x))
            slope_next = _ode_slope(x_predicted, sigmas[i + 1], denoised_next)
            x = x + (slope + slope_next) / 2 * dt
        _report(callback, i, x, denoised, total)
    return x


def _geometric_midpoint(sigma_a, sigma_b):
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


@torch.no_grad()
def sample_dpm_2(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Second-order midpoint method, midpoint taken halfway in log-sigma (DPM-Solver-2 flavour)."""
    total = len(sigmas) - 1
    for i in range(total):
        x, sigma_hat = _churned_sigma(x, sigmas[i], total, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise_fn(x, _per_item(sigma_hat, x))
        slope = _ode_slope(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + slope * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = _geometric_midpoint(sigma_hat, sigmas[i + 1])
            x_mid = x + slope * (sigma_mid - sigma_hat)
            slope_mid = _ode_slope(x_mid, sigma_mid, denoise_fn(x_mid, _per_item(sigma_mid, x)))
            x = x + slope_mid * (sigmas[i + 1] - sigma_hat)
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                           eta=1.0, s_noise=1.0):
    """dpm_2 down to sigma_down, then fresh noise up to the next level."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        slope = _ode_slope(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + slope * (sigma_down - sigmas[i])
        else:
            sigma_mid = _geometric_midpoint(sigmas[i], sigma_down)
            x_mid = x + slope * (sigma_mid - sigmas[i])
            slope_mid = _ode_slope(x_mid, sigma_mid, denoise_fn(x_mid, _per_item(sigma_mid, x)))
            x = x + slope_mid * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        _report(callback, i, x, denoised, total)
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
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
        slopes.append(_ode_slope(x, sigmas[i], denoised))
        if len(slopes) > order:
            slopes.pop(0)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            weights = linear_multistep_coefficients(min(i + 1, order), times, i)
            x = x + sum(w * s for w, s in zip(weights, reversed(slopes)))
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) (Lu et al. 2022, data prediction, single-step 2nd order) with ancestral noise."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + _ode_slope(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_down = -sigmas[i].log(), -torch.as_tensor(sigma_down).log()
            h = lam_down - lam
            sigma_mid = (-(lam + h / 2)).exp()
            x_mid = (sigma_mid / sigmas[i]) * x - (-h / 2).expm1() * denoised
            denoised_mid = denoise_fn(x_mid, _per_item(sigma_mid, x))
            x = (sigma_down / sigmas[i]) * x - (-h).expm1() * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ stochastic, two stages per step (an intermediate point at fraction ``r`` of the step in
    lambda).  Noise comes from ``noise_sampler`` (per-step Gaussian by default; ComfyUI uses a Brownian tree)."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
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
            denoised_mid = denoise_fn(x_mid, _per_item(sigma_mid, x))

            # stage 2: the full step, with the x_0 estimate extrapolated from both evaluations
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
            h_down = -torch.as_tensor(sigma_down).log() - lam
            blended = (1 - weight_mid) * denoised + weight_mid * denoised_mid
            x = (-h_down).exp() * x - (-h_down).expm1() * blended
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """DPM-Solver++(2M): multistep 2nd order, reusing the previous step's x_0 estimate."""
    total = len(sigmas) - 1
    previous_denoised = None
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
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
        _report(callback, i, x, denoised, total)
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
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
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
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep, falling back to 2nd/1st order for the first steps."""
    total = len(sigmas) - 1
    denoised_1 = denoised_2 = None  # x_0 estimates one and two steps back
    h = h_1 = h_2 = None
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
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
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_ddpm(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """Ancestral DDPM steps (Ho et al. 2020, eq. 11 + posterior noise), done in the variance-preserving scale."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, _per_item(sigma, x))
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
        _report(callback, i, x, denoised, total)
    return x


@torch.no_grad()
def sample_lcm(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """Latent Consistency Model sampling: jump to the x_0 estimate, re-noise to the next level."""
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise_fn(x, _per_item(sigmas[i], x))
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
        _report(callback, i, x, denoised, total)
    return x


def _unipc_bh1_update(x, history_denoised, history_lambda, sigma_prev, sigma, lam, order, denoise_fn,
                      use_corrector):
    """One UniPC step (Zhao et al. 2023, arXiv:2302.04867) with the B(h) = h ("bh1") variant, data prediction.

    Predictor UniP-p extrapolates the x_0 estimate from the last ``order`` evaluations; corrector UniC
    re-evaluates the model at the predicted point and refits including it.  Works in the VE scale, where the
    first-order part is (sigma/sigma_prev) x - (e^{-h} - 1) m0.  Returns the new x and the model value there
    (None without the corrector).
    """
    m0 = history_denoised[-1]
    h = lam - history_lambda[-1]
    # Normalised distances (in lambda) of the older evaluations, and divided differences towards m0.
    ratios = []
    differences = []
    for k in range(1, order):
        ratio = (history_lambda[-(k + 1)] - history_lambda[-1]) / h
        ratios.append(ratio)
        differences.append((history_denoised[-(k + 1)] - m0) / ratio)
    ratios.append(1.0)

    # Right-hand side b_k = k! * phi_{k+1}(-h) / B(h) with phi built by the recursion phi_{k+1} = (phi_k - 1/k!)/hh.
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh
    factorial = 1
    rows = []
    rhs = []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in ratios])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    system = torch.tensor(rows, dtype=torch.float64)
    rhs = torch.tensor(rhs, dtype=torch.float64)

    x_first_order = (sigma / sigma_prev) * x - h_phi_1 * m0

    if differences:
        if order == 2:
            predictor_weights = [0.5]
        else:
            predictor_weights = torch.linalg.solve(system[:-1, :-1], rhs[:-1]).tolist()
        correction = sum(w * d for w, d in zip(predictor_weights, differences))
        x_new = x_first_order - b_h * correction
    else:
        x_new = x_first_order

    if not use_corrector:
        return x_new, None
    model_new = denoise_fn(x_new, _per_item(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x))
    corrector_weights = [0.5] if order == 1 else torch.linalg.solve(system, rhs).tolist()
    correction = sum(w * d for w, d in zip(corrector_weights[:-1], differences))
    correction = correction + corrector_weights[-1] * (model_new - m0)
    return x_first_order - b_h * correction, model_new


@torch.no_grad()
def sample_uni_pc(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """UniPC multistep, bh1 variant, order up to 3 with lower orders at the start and end, as ComfyUI's
    ``uni_pc``: a final sigma of 0 is replaced by 0.001, the last step is predictor-only, and the model is
    evaluated once per step.  (ComfyUI returns its input unchanged for a single step; we take one
    first-order step instead.)"""
    if len(sigmas) <= 1:
        return x
    levels = [float(s) for s in sigmas]
    if levels[-1] == 0:
        levels[-1] = UNIPC_FINAL_SIGMA
    total = len(levels) - 1
    order = max(1, min(3, total - 1))
    lambdas = [-math.log(s) for s in levels]

    history_denoised = [denoise_fn(x, _per_item(sigmas[0], x))]
    history_lambda = [lambdas[0]]
    for i in range(1, total + 1):
        # step i-1 moves x from levels[i-1] to levels[i]
        step_order = i if i < order else min(order, total + 1 - i)  # lower order at the end is more stable
        final = i == total
        denoised_at_start = history_denoised[-1]
        x, model_value = _unipc_bh1_update(x, history_denoised, history_lambda, levels[i - 1], levels[i],
                                           lambdas[i], step_order, denoise_fn, use_corrector=not final)
        if not final:
            history_denoised = (history_denoised + [model_value])[-order:]
            history_lambda = (history_lambda + [lambdas[i]])[-order:]
        _report(callback, i - 1, x, denoised_at_start, total)
    return x


# ComfyUI's `ddim` is Euler on the given sigmas (the KSampler glue also re-noises inpainting with seed + 1).
sample_ddim = sample_euler

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
}
SAMPLER_NAMES: list[str] = list(SAMPLERS)

# Samplers that draw fresh noise at some step (their output depends on the seed beyond the initial noise).
STOCHASTIC_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                 "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm"})


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    sampler = SAMPLERS.get(name)
    if sampler is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}")
    return sampler


def sample(name: str, denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
           noise_sampler: Optional[NoiseSampler] = None, callback: Optional[StepCallback] = None,
           **options) -> torch.Tensor:
    """Run sampler ``name`` from ``x`` (already noised to ``sigmas[0]``) along ``sigmas``.

    Fresh noise comes from ``noise_sampler`` if given, else from ``generator``, else from a generator seeded
    from ``seed`` the way ComfyUI seeds it.  ``options`` are the sampler's own keywords (eta, s_noise, ...).
    """
    sampler = get_sampler(name)
    if len(sigmas) <= 1:
        return x
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=seed, generator=generator)
    return sampler(denoise_fn, x, sigmas, noise_sampler=noise_sampler, callback=callback, **options)
