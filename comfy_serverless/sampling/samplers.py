"""Every sampler ComfyUI 0.3.64 offers, by name and in its order, and how each one gets its fresh noise.

A sampler is called as ``function(denoise_fn, x, sigmas, *, noise_sampler, callback, **options)`` with
``denoise_fn(x, sigma) -> x_0`` and returns the final latent (see :mod:`.sampler_common` for the conventions);
the algorithms live in samplers_classic, samplers_multistep, samplers_dpm_solver, samplers_sde, samplers_cfgpp
and samplers_unipc.

Noise, as ComfyUI chooses it per sampler:

* "default": independent draws from a generator seeded with the seed (+1 on CPU), one per step;
* "brownian": a Brownian tree over the schedule's sigma range seeded with the seed (the DPM++ SDE family;
  the ``_gpu`` names are the same algorithms with the tree on the latent's device, so on CPU they coincide);
* "global": torch's global generator (only LCM-upscale and the optional churn of Euler/Heun/DPM-2).

cfg_pp samplers ask the denoiser for the negative prediction through a post-CFG hook
(``denoise_fn(x, sigma, model_options=...)``), which :class:`..denoising.CFGDenoiser` supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import samplers_cfgpp as cfgpp
from . import samplers_dpm_solver as dpm_solver
from . import samplers_multistep as multistep
from . import samplers_sde as sde
from . import samplers_unipc as unipc
from .sampler_common import (  # noqa: F401  (re-exported: the names callers import from here)
    BrownianTreeNoiseSampler,
    DenoiseFn,
    NoiseSampler,
    StepCallback,
    ancestral_step,
    default_noise_sampler,
)
from .samplers_classic import (  # noqa: F401
    linear_multistep_coefficients,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
)
from .samplers_unipc import UNIPC_FINAL_SIGMA, sample_uni_pc, sample_uni_pc_bh2  # noqa: F401

# ComfyUI computes these samplers' sigmas for one step more and drops the next-to-last level, because their
# second-order evaluation at the midpoint towards sigma_min is wasted.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

# ComfyUI's `ddim` is Euler on the given sigmas (the KSampler glue also re-noises inpainting with seed + 1).
sample_ddim = sample_euler


@dataclass(frozen=True)
class SamplerEntry:
    function: Callable[..., torch.Tensor]
    noise: str = "default"  # "default", "brownian" or "global"
    defaults: dict = field(default_factory=dict)  # options this name fixes (overridable by extra options)
    wants_model_sampling: bool = False  # gets model_sampling= (sa_solver's default SDE interval)
    stochastic: bool = False  # draws fresh noise with its default options
    cfg_pp: bool = False  # needs the negative prediction from the guider


def _entry(function, **kw) -> SamplerEntry:
    return SamplerEntry(function, **kw)


_SDE = dict(noise="brownian", stochastic=True)
SAMPLER_ENTRIES: dict[str, SamplerEntry] = {
    "euler": _entry(sample_euler, noise="global"),
    "euler_cfg_pp": _entry(cfgpp.sample_euler_cfg_pp, cfg_pp=True),
    "euler_ancestral": _entry(sample_euler_ancestral, stochastic=True),
    "euler_ancestral_cfg_pp": _entry(cfgpp.sample_euler_ancestral_cfg_pp, stochastic=True, cfg_pp=True),
    "heun": _entry(sample_heun, noise="global"),
    "heunpp2": _entry(multistep.sample_heunpp2, noise="global"),
    "dpm_2": _entry(sample_dpm_2, noise="global"),
    "dpm_2_ancestral": _entry(sample_dpm_2_ancestral, stochastic=True),
    "lms": _entry(sample_lms),
    "dpm_fast": _entry(dpm_solver.sample_dpm_fast),
    "dpm_adaptive": _entry(dpm_solver.sample_dpm_adaptive),
    "dpmpp_2s_ancestral": _entry(sample_dpmpp_2s_ancestral, stochastic=True),
    "dpmpp_2s_ancestral_cfg_pp": _entry(cfgpp.sample_dpmpp_2s_ancestral_cfg_pp, stochastic=True, cfg_pp=True),
    "dpmpp_sde": _entry(sample_dpmpp_sde, **_SDE),
    "dpmpp_sde_gpu": _entry(sample_dpmpp_sde, **_SDE),
    "dpmpp_2m": _entry(sample_dpmpp_2m),
    "dpmpp_2m_cfg_pp": _entry(cfgpp.sample_dpmpp_2m_cfg_pp, cfg_pp=True),
    "dpmpp_2m_sde": _entry(sample_dpmpp_2m_sde, **_SDE),
    "dpmpp_2m_sde_gpu": _entry(sample_dpmpp_2m_sde, **_SDE),
    "dpmpp_2m_sde_heun": _entry(sample_dpmpp_2m_sde, defaults={"solver_type": "heun"}, **_SDE),
    "dpmpp_2m_sde_heun_gpu": _entry(sample_dpmpp_2m_sde, defaults={"solver_type": "heun"}, **_SDE),
    "dpmpp_3m_sde": _entry(sample_dpmpp_3m_sde, **_SDE),
    "dpmpp_3m_sde_gpu": _entry(sample_dpmpp_3m_sde, **_SDE),
    "ddpm": _entry(sample_ddpm, stochastic=True),
    "lcm": _entry(sample_lcm, stochastic=True),
    "ipndm": _entry(multistep.sample_ipndm),
    "ipndm_v": _entry(multistep.sample_ipndm_v),
    "deis": _entry(multistep.sample_deis),
    "res_multistep": _entry(multistep.sample_res_multistep),
    "res_multistep_cfg_pp": _entry(multistep.sample_res_multistep, defaults={"cfg_pp": True}, cfg_pp=True),
    "res_multistep_ancestral": _entry(multistep.sample_res_multistep, defaults={"eta": 1.0}, stochastic=True),
    "res_multistep_ancestral_cfg_pp": _entry(multistep.sample_res_multistep, defaults={"eta": 1.0, "cfg_pp": True},
                                             stochastic=True, cfg_pp=True),
    "gradient_estimation": _entry(multistep.sample_gradient_estimation),
    "gradient_estimation_cfg_pp": _entry(multistep.sample_gradient_estimation, defaults={"cfg_pp": True},
                                         cfg_pp=True),
    "er_sde": _entry(sde.sample_er_sde, stochastic=True),
    "seeds_2": _entry(sde.sample_seeds_2, stochastic=True),
    "seeds_3": _entry(sde.sample_seeds_3, stochastic=True),
    "sa_solver": _entry(sde.sample_sa_solver, wants_model_sampling=True, stochastic=True),
    "sa_solver_pece": _entry(sde.sample_sa_solver, defaults={"use_pece": True}, wants_model_sampling=True,
                             stochastic=True),
    "ddim": _entry(sample_ddim, noise="global"),
    "uni_pc": _entry(unipc.sample_uni_pc),
    "uni_pc_bh2": _entry(unipc.sample_uni_pc_bh2),
}
SAMPLER_NAMES: list[str] = list(SAMPLER_ENTRIES)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {name: e.function for name, e in SAMPLER_ENTRIES.items()}

# Samplers that draw fresh noise at some step (their output depends on the seed beyond the initial noise).
STOCHASTIC_SAMPLERS = frozenset(name for name, e in SAMPLER_ENTRIES.items() if e.stochastic)
CFG_PP_SAMPLERS = frozenset(name for name, e in SAMPLER_ENTRIES.items() if e.cfg_pp)
# Samplers that stop at the schedule's smallest non-zero level instead of walking the given levels to 0.
RANGE_ONLY_SAMPLERS = frozenset({"dpm_fast", "dpm_adaptive"})


def get_entry(name: str) -> SamplerEntry:
    entry = SAMPLER_ENTRIES.get(name)
    if entry is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}")
    return entry


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    return get_entry(name).function


def make_noise_sampler(kind: str, x: torch.Tensor, sigmas: torch.Tensor, seed: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> NoiseSampler:
    """The noise sampler of ``kind`` ("default", "brownian", "global") for this latent and schedule."""
    if kind == "brownian" and generator is None and len(sigmas) > 1 and bool((sigmas > 0).any()):
        return BrownianTreeNoiseSampler.for_sigmas(x, sigmas, seed)
    if kind == "global":
        return default_noise_sampler(x, generator=generator)
    return default_noise_sampler(x, seed=seed, generator=generator)


def run_entry(entry: SamplerEntry, denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
              seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
              noise_sampler: Optional[NoiseSampler] = None, callback: Optional[StepCallback] = None,
              model_sampling=None, options: Optional[dict] = None) -> torch.Tensor:
    """Run one sampler entry from ``x`` (already noised to ``sigmas[0]``); ``options`` override its defaults."""
    if len(sigmas) <= 1:
        return x
    if noise_sampler is None:
        noise_sampler = make_noise_sampler(entry.noise, x, sigmas, seed, generator)
    merged = {**entry.defaults, **(options or {})}
    if entry.wants_model_sampling and "model_sampling" not in merged:
        merged["model_sampling"] = model_sampling
    return entry.function(denoise_fn, x, sigmas, noise_sampler=noise_sampler, callback=callback, **merged)


def sample(name: str, denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
           noise_sampler: Optional[NoiseSampler] = None, callback: Optional[StepCallback] = None,
           model_sampling=None, **options) -> torch.Tensor:
    """Run sampler ``name`` from ``x`` (already noised to ``sigmas[0]``) along ``sigmas``.

    Fresh noise comes from ``noise_sampler`` if given, else from ``generator``, else from the sampler's own kind
    of noise seeded from ``seed`` the way ComfyUI seeds it.  ``options`` are the sampler's own keywords.
    """
    return run_entry(get_entry(name), denoise_fn, x, sigmas, seed=seed, generator=generator,
                     noise_sampler=noise_sampler, callback=callback, model_sampling=model_sampling, options=options)
