"""The noise-level lists of ComfyUI's custom-sampling scheduler nodes, and the operations its sigma nodes do.

Range-only ramps (Karras, exponential: see schedules.py) are joined here by the polyexponential, VP and
Laplace ramps; SD-Turbo's and Align Your Steps' fixed tables; and the sigma tools (split, flip, extend).
Every function returns a float32 tensor.
"""

from __future__ import annotations

import math

import torch

from .schedules import beta_scheduler, calculate_sigmas

# Align Your Steps (Sabour et al. 2024, NVIDIA): the 10-step noise levels published for each model family.
ALIGN_YOUR_STEPS_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def _with_final_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log sigma moves from log sigma_max to log sigma_min along ramp^rho (rho = 1: exponential schedule)."""
    ramp = torch.linspace(1, 0, steps) ** rho
    return _with_final_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def vp_sigmas(steps: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> torch.Tensor:
    """The continuous VP-SDE's noise levels at times evenly spaced from 1 down to eps_s."""
    t = torch.linspace(1, eps_s, steps)
    return _with_final_zero(torch.sqrt(torch.special.expm1(beta_d * t ** 2 / 2 + beta_min * t)))


def laplace_sigmas(steps: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> torch.Tensor:
    """log sigma at evenly spaced quantiles of a Laplace(mu, beta) distribution, highest first, clamped to the
    range (Tiankai et al. 2024).  Like ComfyUI, no final 0 is appended: the last level is sigma_min."""
    x = torch.linspace(0, 1, steps)
    log_sigma = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return torch.clamp(torch.exp(log_sigma), min=sigma_min, max=sigma_max)


def basic_sigmas(model_sampling, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """BasicScheduler: a schedule for int(steps / denoise) steps, of which the last steps + 1 levels."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros([0])
        total = int(steps / denoise)
    return calculate_sigmas(model_sampling, scheduler, total).cpu()[-(steps + 1):]


def beta_sampling_sigmas(model_sampling, steps: int, alpha: float, beta: float) -> torch.Tensor:
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"the beta schedule needs alpha > 0 and beta > 0, got {alpha} and {beta}")
    return beta_scheduler(model_sampling, steps, alpha=alpha, beta=beta)


def sd_turbo_sigmas(model_sampling, steps: int, denoise: float) -> torch.Tensor:
    """SD-Turbo's levels: timesteps 999, 899, ..., 99, starting 10 * (1 - denoise) entries in, ``steps`` of them."""
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + steps]
    return _with_final_zero(model_sampling.sigma(timesteps).float().cpu())


def loglinear_interpolation(levels: list[float], count: int) -> list[float]:
    """``count`` decreasing levels interpolating ``levels`` (decreasing) linearly in log space."""
    logs = [math.log(v) for v in reversed(levels)]
    positions = [i / (len(levels) - 1) for i in range(len(levels))]
    result = []
    for k in range(count):
        p = k / (count - 1) if count > 1 else 0.0
        j = min(max(sum(1 for q in positions if q <= p) - 1, 0), len(levels) - 2)
        weight = (p - positions[j]) / (positions[j + 1] - positions[j])
        result.append(math.exp(logs[j] + weight * (logs[j + 1] - logs[j])))
    return result[::-1]


def align_your_steps_sigmas(model_type: str, steps: int, denoise: float) -> torch.Tensor:
    levels = ALIGN_YOUR_STEPS_LEVELS.get(model_type)
    if levels is None:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {list(ALIGN_YOUR_STEPS_LEVELS)}")
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros([0])
        total = round(steps * denoise)
    if steps + 1 != len(levels):
        levels = loglinear_interpolation(levels, steps + 1)
    picked = list(levels)[-(total + 1):]
    picked[-1] = 0.0
    return torch.tensor(picked, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Sigma tools
# ---------------------------------------------------------------------------------------------------------

def split_at_step(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels up to and including ``step``, and from ``step`` on (the split level is in both)."""
    return sigmas[:step + 1], sigmas[step:]


def split_at_denoise(sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last round(steps * denoise) steps go to the second part (which shares its first level)."""
    steps = max(sigmas.shape[-1] - 1, 0)
    low_steps = round(steps * denoise)
    return sigmas[:-low_steps], sigmas[-(low_steps + 1):]


def flip(sigmas: torch.Tensor) -> torch.Tensor:
    """Reversed (for unsampling); a leading 0 becomes 0.0001 so the first step is defined."""
    if len(sigmas) == 0:
        return sigmas
    flipped = sigmas.flip(0)
    if flipped[0] == 0:
        flipped[0] = 0.0001
    return flipped


def set_first(sigmas: torch.Tensor, sigma: float) -> torch.Tensor:
    changed = sigmas.clone()
    if len(changed) == 0:
        raise ValueError("SetFirstSigma got an empty SIGMAS")
    changed[0] = sigma
    return changed


SPACINGS = {
    "linear": lambda x: x,
    "cosine": lambda x: torch.sin(x * math.pi / 2),
    "sine": lambda x: 1 - torch.cos(x * math.pi / 2),
}


def extend_intermediate(sigmas: torch.Tensor, steps: int, start_at_sigma: float, end_at_sigma: float,
                        spacing: str) -> torch.Tensor:
    """Insert steps - 1 levels into every interval whose upper level lies in [end_at_sigma, start_at_sigma]
    (start < 0 = no upper limit), spaced by ``spacing`` between the interval's ends."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {list(SPACINGS)}")
    if start_at_sigma < 0:
        start_at_sigma = float("inf")
    fractions = SPACINGS[spacing](torch.linspace(0, 1, steps + 1)[1:-1])
    extended: list[float] = []
    for i in range(len(sigmas) - 1):
        current, following = float(sigmas[i]), float(sigmas[i + 1])
        extended.append(current)
        if end_at_sigma <= current <= start_at_sigma:
            extended.extend((fractions * (following - current) + current).tolist())
    if len(sigmas) > 0:
        extended.append(float(sigmas[-1]))
    return torch.tensor(extended, dtype=torch.float32)
