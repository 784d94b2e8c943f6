"""The functions the extra guidance nodes (nodes/guidance_extra.py) install on a MODEL, in ComfyUI's patch
signatures: pre-cfg functions take {"conds", "conds_out", "cond_scale", "sigma", "input", ...} and return the new
conds_out; post-cfg functions take {"denoised", "cond_denoised", "uncond_denoised", "cond_scale", ...} and return
the new denoised; ToMe's pair is an attn1_patch (n, context, value, extra) and an attn1_output_patch (n, extra).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..sampling.denoising import CFGDenoiser, _merged_options
from ..sampling.guiders import Guider

# ToMe merges tokens inside 2x2 cells of the latent grid: one destination per cell.
TOME_STRIDE = 2


def _keeps_both_sides(args: dict) -> bool:
    """Whether a pre-cfg call has a real negative prediction (the cfg-1 shortcut leaves it out)."""
    return len(args["conds_out"]) > 1 and None not in args["conds"][:2]


# ---- APG ----------------------------------------------------------------------------------------------

def project(vector: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`vector` split per batch item into its part along `onto` (over C, H, W) and the orthogonal rest."""
    dims = (-1, -2, -3)
    unit = F.normalize(onto, dim=dims)
    parallel = (vector * unit).sum(dim=dims, keepdim=True) * unit
    return parallel, vector - parallel


def apg_pre_cfg_function(eta: float, norm_threshold: float, momentum: float):
    """Adaptive Projected Guidance (Sadat et al. 2024): the guidance cond - uncond, averaged with momentum over
    steps, its norm capped at norm_threshold, its part parallel to the conditional prediction scaled by eta.
    ComfyUI's convention: the cond it returns makes plain CFG give uncond + cfg * guidance' + (cond - uncond)."""
    state = {"average": None, "sigma": None}

    def apg(args):
        conds_out = args["conds_out"]
        if len(conds_out) == 1:
            return conds_out
        cond, uncond = conds_out[0], conds_out[1]
        sigma = args["sigma"][0]
        if state["sigma"] is not None and sigma > state["sigma"]:
            state["average"] = None  # a new sampling run (sigmas only fall within one)
        state["sigma"] = sigma
        guidance = cond - uncond
        if momentum != 0:
            average = state["average"]
            state["average"] = guidance if average is None else momentum * average + guidance
            guidance = state["average"]
        if norm_threshold > 0:
            norm = guidance.norm(p=2, dim=(-1, -2, -3), keepdim=True)
            guidance = guidance * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
        parallel, orthogonal = project(guidance, cond)
        modified = orthogonal + eta * parallel
        return [uncond + modified + (cond - uncond) / args["cond_scale"], uncond, *conds_out[2:]]

    return apg


# ---- TCFG ---------------------------------------------------------------------------------------------

def tangential_damping(cond_score: torch.Tensor, uncond_score: torch.Tensor) -> torch.Tensor:
    """TCFG (Kwon et al. 2025): the unconditional score reduced to its component along the first right singular
    vector of the per-item 2 x D matrix [uncond; cond], dropping its tangential part."""
    batch = cond_score.shape[0]
    uncond_flat = uncond_score.reshape(batch, 1, -1).float()
    stacked = torch.cat((uncond_flat, cond_score.reshape(batch, 1, -1).float()), dim=1)
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    principal = vh[:, 0:1, :]
    damped = (uncond_flat @ principal.transpose(-2, -1)) * principal
    return damped.reshape_as(uncond_score).to(uncond_score.dtype)


def tcfg_pre_cfg_function():
    def tcfg(args):
        conds_out = args["conds_out"]
        if not _keeps_both_sides(args):
            return conds_out
        x = args["input"]
        cond, uncond = conds_out[0], conds_out[1]
        uncond_score = tangential_damping(x - cond, x - uncond)
        return [cond, x - uncond_score, *conds_out[2:]]

    return tcfg


# ---- FreSca -------------------------------------------------------------------------------------------

def frequency_scale(x: torch.Tensor, scale_low: float, scale_high: float, freq_cutoff: int) -> torch.Tensor:
    """x's 2D spectrum scaled: the (2*freq_cutoff)² square around DC by scale_low, everything else by scale_high
    (the square's bounds are plain slices, so a cutoff past the centre wraps as ComfyUI's does)."""
    dtype = x.dtype
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    mask = torch.full(spectrum.shape, float(scale_high), device=x.device)
    row, col = height // 2, width // 2
    mask[..., row - freq_cutoff:row + freq_cutoff, col - freq_cutoff:col + freq_cutoff] = scale_low
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(dtype)


def fresca_pre_cfg_function(scale_low: float, scale_high: float, freq_cutoff: int):
    """FreSca (Huang et al. 2025): the guidance cond - uncond rescaled per frequency band."""

    def fresca(args):
        conds_out = args["conds_out"]
        if not _keeps_both_sides(args):
            return conds_out
        cond, uncond = conds_out[0], conds_out[1]
        filtered = frequency_scale(cond - uncond, scale_low, scale_high, freq_cutoff)
        return [filtered + uncond, uncond, *conds_out[2:]]

    return fresca


# ---- Mahiro -------------------------------------------------------------------------------------------

def mahiro_post_cfg_function():
    """Mahiro: blends the CFG result with the conditional prediction times cfg ("leap"), weighted by how alike
    the sign-kept square roots of the unconditional leap and of (leap + cfg result) / 2 are (cosine over
    channels, averaged): alike -> the CFG result, opposed -> the leap."""

    def mahiro(args):
        scale = args["cond_scale"]
        leap = args["cond_denoised"] * scale
        uncond_leap = args["uncond_denoised"] * scale
        guided = args["denoised"]
        merged = (leap + guided) / 2
        similarity = F.cosine_similarity(_signed_sqrt(uncond_leap), _signed_sqrt(merged)).mean()
        weight = 2 * (similarity + 1)  # 0..4
        return (weight * guided + (4 - weight) * leap) / 4

    return mahiro


def _signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.abs()) * x.sign()


# ---- ToMe ---------------------------------------------------------------------------------------------

def _identity(x):
    return x


def bipartite_merge(metric: torch.Tensor, width: int, height: int, r: int,
                    generator: Optional[torch.Generator] = None) -> tuple[Callable, Callable]:
    """ToMe for SD (Bolya & Hoffman 2023): split the width x height tokens into one random destination per 2x2
    cell and sources (the rest), and pair each source with its most cosine-similar destination; the r sources
    with the best matches are averaged into their destination. Returns merge(x) -> fewer tokens (kept sources,
    then destinations) and unmerge(y) -> all tokens back (a merged source copies its destination)."""
    batch, tokens, _ = metric.shape
    if r <= 0 or width == 1 or height == 1:
        return _identity, _identity
    device = metric.device
    cells_y, cells_x = height // TOME_STRIDE, width // TOME_STRIDE
    cell_size = TOME_STRIDE * TOME_STRIDE
    with torch.no_grad():
        choice = torch.randint(cell_size, (cells_y, cells_x), generator=generator,
                               device="cpu" if generator is not None else device).to(device)
        is_dst_cells = F.one_hot(choice, cell_size).bool()  # [cells_y, cells_x, 4] in-cell row-major order
        is_dst_cells = is_dst_cells.view(cells_y, cells_x, TOME_STRIDE, TOME_STRIDE).permute(0, 2, 1, 3)
        is_dst = torch.zeros(height, width, dtype=torch.bool, device=device)  # cells past the edge: sources
        is_dst[:cells_y * TOME_STRIDE, :cells_x * TOME_STRIDE] = is_dst_cells.reshape(cells_y * TOME_STRIDE,
                                                                                     cells_x * TOME_STRIDE)
        is_dst = is_dst.reshape(-1)
        dst_pos = is_dst.nonzero().squeeze(1)
        src_pos = (~is_dst).nonzero().squeeze(1)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(-1, -2)
        r = min(int(src_pos.numel()), r)
        best, best_dst = scores.max(dim=-1)
        ranking = best.argsort(dim=-1, descending=True)
        merged_src = ranking[:, :r]  # indices into the sources, per batch item
        kept_src = ranking[:, r:]
        target = best_dst.gather(1, merged_src)  # index into the destinations

    def take(x, positions, rows):
        return x[:, positions].gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def merge(x):
        channels = x.shape[-1]
        kept = take(x, src_pos, kept_src)
        moving = take(x, src_pos, merged_src)
        dst = x[:, dst_pos].scatter_reduce(1, target.unsqueeze(-1).expand(-1, -1, channels), moving, reduce="mean",
                                           include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(y):
        channels = y.shape[-1]
        kept, dst = y[:, :kept_src.shape[1]], y[:, kept_src.shape[1]:]
        out = torch.zeros(batch, tokens, channels, device=y.device, dtype=y.dtype)
        out[:, dst_pos] = dst
        out.scatter_(1, src_pos[kept_src].unsqueeze(-1).expand(-1, -1, channels), kept)
        copied = dst.gather(1, target.unsqueeze(-1).expand(-1, -1, channels))
        out.scatter_(1, src_pos[merged_src].unsqueeze(-1).expand(-1, -1, channels), copied)
        return out

    return merge, unmerge


def tome_functions(x: torch.Tensor, ratio: float, original_shape, generator=None) -> tuple[Callable, Callable]:
    """Merge/unmerge for the tokens x of one attention layer: only at the latent's full resolution (as ComfyUI),
    merging int(tokens * ratio) of them."""
    _, _, height, width = original_shape
    downsample = int(math.ceil(math.sqrt(height * width // x.shape[1])))
    if downsample > 1:
        return _identity, _identity
    return bipartite_merge(x, int(math.ceil(width / downsample)), int(math.ceil(height / downsample)),
                           int(x.shape[1] * ratio), generator)


def tome_patches(ratio: float, generator=None) -> tuple[Callable, Callable]:
    """(attn1_patch, attn1_output_patch): self-attention queries merged before attention (keys and values keep
    every token), the output unmerged after it."""
    pending = []

    def merge_queries(n, context, value, extra_options):
        merge, unmerge = tome_functions(n, ratio, extra_options["original_shape"], generator)
        pending.append(unmerge)
        return merge(n), context, value

    def unmerge_output(n, extra_options):
        return pending.pop()(n) if pending else n

    return merge_queries, unmerge_output


# ---- Perp-Neg guider ----------------------------------------------------------------------------------

def perp_neg_combine(positive, negative, empty, neg_scale: float, cfg: float) -> torch.Tensor:
    """Perp-Neg (Armandpour et al. 2023): empty + cfg * (pos - neg_scale * the part of neg perpendicular to pos),
    pos and neg taken relative to the empty prompt's prediction."""
    pos = positive - empty
    neg = negative - empty
    perpendicular = neg - (neg * pos).sum() / torch.linalg.vector_norm(pos) ** 2 * pos
    return empty + cfg * (pos - perpendicular * neg_scale)


class PerpNegDenoiser:
    """D(x, sigma) of the Perp-Neg guider: one batched UNet pass over positive, negative and empty prompts, the
    model's pre-cfg functions, the Perp-Neg combination, then its post-cfg functions (with the empty side added
    to their arguments, as ComfyUI does)."""

    def __init__(self, base: CFGDenoiser, empty: list, neg_scale: float):
        self.base, self.empty, self.neg_scale = base, empty, float(neg_scale)
        self.parts = (base,)
        self.model_options = base.model_options

    def __call__(self, x, sigma, model_options=None):
        base = self.base
        options = _merged_options(base.model_options, model_options)
        if not getattr(base, "_controls_ready", True) and hasattr(base, "_pre_run_controls"):
            base._pre_run_controls()
        positive, negative, empty = base.positive, base.negative, self.empty
        if not options.get("disable_cfg1_optimization", False) and math.isclose(self.neg_scale, 0.0):
            negative = None
            if math.isclose(base.cfg, 1.0):
                empty = None
        conds = [positive, negative, empty]
        out = base.calc_cond_batch(conds, x, sigma, options)
        for function in options.get("sampler_pre_cfg_function", ()):
            out = function({"conds": conds, "conds_out": out, "cond_scale": base.cfg, "timestep": sigma,
                            "input": x, "sigma": sigma, "model": base, "model_options": options})
        result = perp_neg_combine(out[0], out[1], out[2], self.neg_scale, base.cfg)
        for function in options.get("sampler_post_cfg_function", ()):
            result = function({"denoised": result, "cond": positive, "uncond": negative, "cond_scale": base.cfg,
                               "model": base, "uncond_denoised": out[1], "cond_denoised": out[0], "sigma": sigma,
                               "model_options": options, "input": x, "empty_cond": empty,
                               "empty_cond_denoised": out[2]})
        return result


class PerpNegGuider(Guider):
    """ComfyUI's Guider_PerpNeg: set_conds(positive, negative, empty_negative_prompt), set_cfg(cfg, neg_scale)."""

    def __init__(self, model_patcher):
        super().__init__(model_patcher)
        self.neg_scale = 1.0

    def set_conds(self, positive, negative, empty_negative_prompt) -> None:  # type: ignore[override]
        self.inner_set_conds({"positive": positive, "empty_negative_prompt": empty_negative_prompt,
                              "negative": negative})

    def set_cfg(self, cfg: float, neg_scale: float = 1.0) -> None:  # type: ignore[override]
        self.cfg, self.neg_scale = float(cfg), float(neg_scale)

    def make_denoiser(self) -> Callable:
        from ..sampling.conditions import normalise_conditioning

        conds = self.original_conds
        base = self._base_denoiser(conds.get("positive"), conds.get("negative"), self.cfg)
        return PerpNegDenoiser(base, normalise_conditioning(conds.get("empty_negative_prompt")), self.neg_scale)
