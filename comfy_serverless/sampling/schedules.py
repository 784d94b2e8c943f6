"""Noise schedules of discrete-time diffusion models and ComfyUI's schedulers by name.

A model trained on N discrete timesteps (Stable Diffusion: N = 1000, "scaled linear" betas from 0.00085 to
0.012) defines a table of noise levels sigma_t = sqrt((1 - alphā_t) / alphā_t) in the variance-exploding
("k-diffusion") parameterisation x_t = x_0 + sigma_t * eps.  Samplers walk a decreasing subset of those noise
levels, ending at 0; a *scheduler* picks that subset.

Every scheduler here has the signature ``(model_sampling, steps) -> sigmas`` where ``model_sampling`` is
anything with the attributes of :class:`DiscreteSchedule` (``sigmas``, ``sigma_min``, ``sigma_max``,
``timestep()``, ``sigma()``), and returns a float32 tensor that is decreasing and ends in 0.  Step placement
follows ComfyUI's ``comfy/samplers.py`` so the same workflow walks the same noise levels; the length is
``steps + 1`` except where ComfyUI itself differs (``ddim_uniform`` when ``steps`` does not divide the table
size, and ``beta`` when two steps round to the same table entry, which only happens for very many steps).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_TIMESTEPS = 1000

# percent_to_sigma's answer for "before sampling starts": larger than any real sigma.
SIGMA_BEFORE_START = 999999999.9


def scaled_linear_betas(beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END,
                        num_timesteps: int = SD_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Betas spaced linearly in sqrt(beta) (what SD calls "linear" and diffusers "scaled_linear"), float64."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2


class DiscreteSchedule:
    """The sigma table of a discrete-time model, and conversions between sigma and (fractional) timestep."""

    def __init__(self, beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END,
                 num_timesteps: int = SD_TRAIN_TIMESTEPS, betas: torch.Tensor | None = None):
        if betas is None:
            betas = scaled_linear_betas(beta_start, beta_end, num_timesteps)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.num_timesteps = int(betas.shape[0])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.set_sigmas(sigmas)

    def set_sigmas(self, sigmas: torch.Tensor) -> None:
        # The log is taken before the float32 cast, as ComfyUI does, so table look-ups agree to the last bit.
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Index of the table entry whose log-sigma is nearest (what the UNet is fed), same shape as sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        distances = sigma.log().to(self.log_sigmas.device).reshape(1, -1) - self.log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Sigma at a fractional timestep, interpolating linearly in log-sigma between table entries."""
        timestep = torch.as_tensor(timestep)
        t = timestep.float().to(self.log_sigmas.device).clamp(0, len(self.sigmas) - 1)
        below = t.floor().long()
        above = t.ceil().long()
        weight = t.frac()
        log_sigma = (1 - weight) * self.log_sigmas[below] + weight * self.log_sigmas[above]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma reached after ``percent`` of the sampling run (0 = start, 1 = end), as ComfyUI measures it."""
        if percent <= 0.0:
            return SIGMA_BEFORE_START
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1))).item()


# --------------------------------------------------------------------------------------------------------
# Sigma ramps that depend only on the range (sigma_min, sigma_max)
# --------------------------------------------------------------------------------------------------------

def _with_final_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps)
    high = sigma_max ** (1 / rho)
    low = sigma_min ** (1 / rho)
    return _with_final_zero((high + ramp * (low - high)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform steps in log-sigma."""
    return _with_final_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform steps in arctan(sigma) (the KL-optimal schedule of "Align Your Steps", arXiv:2404.14507)."""
    # ComfyUI divides by steps - 1, which is 0/0 for a single step; that step is taken at sigma_max here.
    fraction = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    angles = fraction * math.atan(sigma_min) + (1 - fraction) * math.atan(sigma_max)
    return _with_final_zero(angles.tan())


# --------------------------------------------------------------------------------------------------------
# Regularised incomplete beta function and its inverse (for the `beta` scheduler; no scipy at runtime)
# --------------------------------------------------------------------------------------------------------

def _log_beta_function(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _incomplete_beta_continued_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction of I_x(a, b) (Abramowitz & Stegun 26.5.8), evaluated with Lentz's method.

    Converges quickly for x < (a + 1) / (a + b + 2); the caller uses the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    otherwise.
    """
    tiny = 1e-300
    # The fraction is 1 / (1 + d1 / (1 + d2 / (1 + ...))); Lentz keeps f = C * D products of partial ratios.
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        # even term d_{2m}
        numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        # odd term d_{2m+1}
        numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        ratio = c * d
        f *= ratio
        if abs(ratio - 1.0) < 1e-16:
            break
    return f


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b): the CDF of the Beta(a, b) distribution at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta_function(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_continued_fraction(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of :func:`regularized_incomplete_beta` in x: Newton steps kept inside a shrinking bracket."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    log_norm = _log_beta_function(a, b)
    low, high = 0.0, 1.0
    x = 0.5
    for _ in range(200):
        error = regularized_incomplete_beta(x, a, b) - q
        if error == 0.0:
            return x
        if error > 0.0:
            high = x
        else:
            low = x
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_norm)
        candidate = x - error / density if density > 0.0 else low - 1.0
        if not (low < candidate < high):
            candidate = 0.5 * (low + high)  # Newton left the bracket: bisect instead
        if abs(candidate - x) <= 1e-16 * max(x, 1e-300) or high - low <= 1e-17:
            return candidate
        x = candidate
    return x


# --------------------------------------------------------------------------------------------------------
# ComfyUI's schedulers
# --------------------------------------------------------------------------------------------------------

def simple_scheduler(model_sampling, steps: int) -> torch.Tensor:
    """Every (table size / steps)-th table entry, counting down from the noisiest."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    picked = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def ddim_uniform_scheduler(model_sampling, steps: int) -> torch.Tensor:
    """Table entries 1, 1 + k, 1 + 2k, ... (k = table size // steps) reversed, as the original DDIM code spaced them."""
    table = model_sampling.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=1e-5):
        # zero-terminal-SNR tables already contain the final 0 at entry 1 (ComfyUI's special case)
        steps += 1
        picked = []
    else:
        picked = [0.0]
    stride = max(len(table) // steps, 1)
    picked += [float(table[i]) for i in range(1, len(table), stride)]
    return torch.tensor(picked[::-1], dtype=torch.float32)


def normal_scheduler(model_sampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Uniform in timestep between sigma_max and sigma_min (``sgm``: steps+1 points with the last dropped)."""
    start = float(model_sampling.timestep(model_sampling.sigma_max))
    end = float(model_sampling.timestep(model_sampling.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(torch.tensor(end))), 0, abs_tol=1e-5):
            steps += 1  # the table already ends at sigma 0
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    picked = [float(model_sampling.sigma(t)) for t in timesteps]
    if append_zero:
        picked.append(0.0)
    return torch.tensor(picked, dtype=torch.float32)


def sgm_uniform_scheduler(model_sampling, steps: int) -> torch.Tensor:
    return normal_scheduler(model_sampling, steps, sgm=True)


def karras_scheduler(model_sampling, steps: int) -> torch.Tensor:
    return karras_sigmas(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def exponential_scheduler(model_sampling, steps: int) -> torch.Tensor:
    return exponential_sigmas(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def kl_optimal_scheduler(model_sampling, steps: int) -> torch.Tensor:
    return kl_optimal_sigmas(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def beta_scheduler(model_sampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(alpha, beta) quantiles (Lee et al. 2024, arXiv:2407.12173), rounded to table entries.

    With alpha = beta < 1 the steps crowd at both ends of the schedule.  Consecutive steps that round to the
    same table entry are merged, as ComfyUI does.
    """
    last_index = len(model_sampling.sigmas) - 1
    picked = []
    previous = None
    for i in range(steps):
        quantile = 1.0 - i / steps
        index = round(beta_ppf(quantile, alpha, beta) * last_index)  # round half to even, like numpy.rint
        if index != previous:
            picked.append(float(model_sampling.sigmas[index]))
        previous = index
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def linear_quadratic_scheduler(model_sampling, steps: int, threshold_noise: float = 0.025,
                               linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's schedule: a slow linear start down to ``threshold_noise``, then a quadratic run to 0.

    In "progress" u = 1 - sigma/sigma_max: u rises linearly by threshold_noise/linear_steps per step for the
    first linear_steps steps, then follows the parabola that continues that value and slope and reaches
    u = 1 at the final step.
    """
    if steps == 1:
        progress = [0.0, 1.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        slope = threshold_noise / linear_steps
        quadratic_steps = steps - linear_steps
        curvature = (linear_steps - threshold_noise * steps) / (linear_steps * quadratic_steps ** 2)
        progress = [i * slope for i in range(linear_steps)]
        for i in range(linear_steps, steps):
            offset = i - linear_steps
            progress.append(threshold_noise + slope * offset + curvature * offset ** 2)
        progress.append(1.0)
    remaining = torch.tensor([1.0 - u for u in progress], dtype=torch.float32)
    return remaining * model_sampling.sigma_max.cpu()


SCHEDULERS: dict[str, Callable[..., torch.Tensor]] = {
    "simple": simple_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}
SCHEDULER_NAMES: list[str] = list(SCHEDULERS)


def calculate_sigmas(model_sampling, scheduler_name: str, steps: int) -> torch.Tensor:
    """The noise levels ``scheduler_name`` picks for ``steps`` steps (float32, ending in 0)."""
    scheduler = SCHEDULERS.get(scheduler_name)
    if scheduler is None:
        raise ValueError(f"unknown scheduler {scheduler_name!r}; expected one of {SCHEDULER_NAMES}")
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return scheduler(model_sampling, int(steps))
