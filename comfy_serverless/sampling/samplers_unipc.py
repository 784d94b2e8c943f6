"""UniPC (Zhao et al. 2023, arXiv:2302.04867): a unified predictor-corrector multistep solver in lambda = -log sigma,
data prediction, in ComfyUI's two flavours: ``uni_pc`` (B(h) = h) and ``uni_pc_bh2`` (B(h) = e^h - 1)."""

from __future__ import annotations

import math

import torch

from .sampler_common import DenoiseFn, per_item, report

# Where UniPC stops instead of sigma 0 (lambda = -log sigma must stay finite), as ComfyUI does.
UNIPC_FINAL_SIGMA = 0.001


def _unipc_update(x, history_denoised, history_lambda, sigma_prev, sigma, lam, order, denoise_fn,
                  use_corrector, variant):
    """One UniPC step (Zhao et al. 2023, arXiv:2302.04867), data prediction, with B(h) = h ("bh1") or
    B(h) = e^h - 1 ("bh2"), h measured in -lambda as in the paper's code.

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
    b_h = hh if variant == "bh1" else h_phi_1
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
    model_new = denoise_fn(x_new, per_item(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x))
    corrector_weights = [0.5] if order == 1 else torch.linalg.solve(system, rhs).tolist()
    correction = sum(w * d for w, d in zip(corrector_weights[:-1], differences))
    correction = correction + corrector_weights[-1] * (model_new - m0)
    return x_first_order - b_h * correction, model_new


@torch.no_grad()
def sample_uni_pc(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None, variant="bh1"):
    """UniPC multistep (``variant`` "bh1" or "bh2"), order up to 3 with lower orders at the start and end, as ComfyUI's
    ``uni_pc``: a final sigma of 0 is replaced by 0.001, the last step is predictor-only, and the model is
    evaluated once per step.  (ComfyUI returns its input unchanged for a single step; we take one
    first-order step instead.)"""
    if variant not in ("bh1", "bh2"):
        raise ValueError("variant must be 'bh1' or 'bh2'")
    if len(sigmas) <= 1:
        return x
    levels = [float(s) for s in sigmas]
    if levels[-1] == 0:
        levels[-1] = UNIPC_FINAL_SIGMA
    total = len(levels) - 1
    order = max(1, min(3, total - 1))
    lambdas = [-math.log(s) for s in levels]

    history_denoised = [denoise_fn(x, per_item(sigmas[0], x))]
    history_lambda = [lambdas[0]]
    for i in range(1, total + 1):
        # step i-1 moves x from levels[i-1] to levels[i]
        step_order = i if i < order else min(order, total + 1 - i)  # lower order at the end is more stable
        final = i == total
        denoised_at_start = history_denoised[-1]
        x, model_value = _unipc_update(x, history_denoised, history_lambda, levels[i - 1], levels[i], lambdas[i],
                                       step_order, denoise_fn, use_corrector=not final, variant=variant)
        if not final:
            history_denoised = (history_denoised + [model_value])[-order:]
            history_lambda = (history_lambda + [lambdas[i]])[-order:]
        report(callback, i - 1, x, denoised_at_start, total)
    return x


@torch.no_grad()
def sample_uni_pc_bh2(denoise_fn: DenoiseFn, x, sigmas, *, noise_sampler=None, callback=None):
    """UniPC with B(h) = e^h - 1 (ComfyUI's ``uni_pc_bh2``)."""
    return sample_uni_pc(denoise_fn, x, sigmas, noise_sampler=noise_sampler, callback=callback, variant="bh2")
