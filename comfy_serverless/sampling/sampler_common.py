"""Pieces every sampler module shares: the call signatures, noise samplers, ancestral steps, progress reports.

Samplers integrate the probability-flow ODE (or a reverse SDE) of x_sigma = x_0 + sigma * eps given a denoiser
``denoise_fn(x, sigma) -> x_0 estimate`` (``sigma`` one level per batch item).  Fresh noise comes from a
*noise sampler* ``noise_sampler(sigma, sigma_next) -> standard normal tensor shaped like x``:

* :func:`default_noise_sampler`: an independent draw per call from a generator seeded as ComfyUI seeds it;
* :class:`BrownianTreeNoiseSampler`: increments of one fixed Brownian path W(sigma), normalised to unit
  variance, so the noise a step sees depends on the interval it covers, not on how many steps came before
  (what ComfyUI uses for the DPM++ SDE samplers).  The path is built here by binary Brownian-bridge refinement
  with a seeded draw per tree node; its values are not torchsde's, its statistics are.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch

DenoiseFn = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


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


class BrownianTree:
    """A Brownian path W on [t0, t1] (W(t0) = 0) that can be queried at any time, in any order, always giving
    the same values for a seed.  W(t1) is drawn first; each midpoint is then drawn from the Brownian bridge
    between its interval's ends, with its own seeded generator, down to ``depth`` halvings; below that the
    path is linear (the leaves are 2**-depth of the interval wide)."""

    def __init__(self, like: torch.Tensor, t0: float, t1: float, seed: int, depth: int = 24):
        if not t1 > t0:
            raise ValueError(f"BrownianTree needs t0 < t1, got {t0} and {t1}")
        self.shape, self.dtype = like.shape, like.dtype
        self.t0, self.t1, self.seed, self.depth = float(t0), float(t1), int(seed), depth
        self._nodes: dict[tuple[int, int], torch.Tensor] = {}
        self._end = self._normal(0, 1) * math.sqrt(self.t1 - self.t0)

    def _normal(self, level: int, index: int) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}/{level}/{index}".encode(), digest_size=8).digest()
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF)
        return torch.randn(self.shape, dtype=torch.float64, generator=generator)

    def value(self, t: float) -> torch.Tensor:
        t = min(max(float(t), self.t0), self.t1)
        a, b, w_a, w_b = self.t0, self.t1, torch.zeros(self.shape, dtype=torch.float64), self._end
        index = 0
        for level in range(1, self.depth + 1):
            if t == a:
                return w_a
            if t == b:
                return w_b
            middle = 0.5 * (a + b)
            key = (level, 2 * index + 1)
            w_m = self._nodes.get(key)
            if w_m is None:
                w_m = 0.5 * (w_a + w_b) + math.sqrt(0.25 * (b - a)) * self._normal(*key)
                self._nodes[key] = w_m
            if t < middle:
                b, w_b, index = middle, w_m, 2 * index
            else:
                a, w_a, index = middle, w_m, 2 * index + 1
        weight = (t - a) / (b - a)
        return w_a + (w_b - w_a) * weight

    def __call__(self, s: float, t: float) -> torch.Tensor:
        """W(t) - W(s)."""
        return self.value(t) - self.value(s)


class BrownianTreeNoiseSampler:
    """ComfyUI's Brownian-tree noise for SDE samplers: (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| on
    a path over [sigma_min, sigma_max] (the smallest non-zero and the largest level of the schedule)."""

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: Optional[int] = None):
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, ()).item())
        self.like = x
        self.tree = BrownianTree(x, float(sigma_min), float(sigma_max), seed)

    @classmethod
    def for_sigmas(cls, x: torch.Tensor, sigmas: torch.Tensor, seed: Optional[int] = None):
        positive = sigmas[sigmas > 0]
        low, high = float(positive.min()), float(sigmas.max())
        if not high > low:
            high = low * (1 + 1e-6) + 1e-9
        return cls(x, low, high, seed)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        s, t = float(sigma), float(sigma_next)
        if s == t:
            return torch.zeros_like(self.like)
        step = self.tree(min(s, t), max(s, t)) / math.sqrt(abs(t - s))
        return step.to(dtype=self.like.dtype, device=self.like.device)


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step from sigma_from to sigma_to into a deterministic part down to ``sigma_down`` plus fresh
    noise of std ``sigma_up`` (sigma_down² + sigma_up² = sigma_to²).  eta = 1 is the DDPM posterior variance,
    eta = 0 the deterministic (DDIM) step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def ode_slope(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def per_item(sigma, x):
    return sigma * x.new_ones([x.shape[0]])


def report(callback, i, x, denoised, total):
    if callback is not None:
        callback(i, x, denoised, total)


def churned_sigma(x, sigma, total_steps, noise_sampler, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s optional "churn": raise the noise level a little by adding fresh noise."""
    if s_churn <= 0 or not (s_tmin <= sigma <= s_tmax):
        return x, sigma
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    gamma = min(s_churn / total_steps, 2 ** 0.5 - 1)
    sigma_hat = sigma * (gamma + 1)
    x = x + noise_sampler(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


class UncondCapture:
    """For CFG++ samplers: calls the denoiser with a post-CFG hook that records the unguided (negative) x_0
    estimate of the same call, and asks the guider to compute the negative even at cfg 1.

    ``denoised = capture(x, sigma)`` then ``capture.uncond`` is that call's negative prediction."""

    def __init__(self, denoise_fn: DenoiseFn):
        self.denoise_fn = denoise_fn
        self.uncond: Optional[torch.Tensor] = None
        self.options = {"sampler_post_cfg_function": [self._record], "disable_cfg1_optimization": True}

    def _record(self, args: dict) -> torch.Tensor:
        self.uncond = args["uncond_denoised"]
        return args["denoised"]

    def __call__(self, x, sigma):
        self.uncond = None
        denoised = self.denoise_fn(x, sigma, model_options=self.options)
        if self.uncond is None:
            raise RuntimeError("this CFG++ sampler needs a guider that reports the negative prediction "
                               "(sampler_post_cfg_function); the denoiser given did not call it")
        return denoised
