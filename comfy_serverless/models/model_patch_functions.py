"""The functions ComfyUI's model patch nodes install on a MODEL (nodes/model_patches.py), in ComfyUI's patch
signatures: cfg / post-cfg functions take ComfyUI's argument dict, block patches (h, [skip,] transformer_options),
attention patches (q, k, v, extra_options). Each is built by a factory taking the node's inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Added to norms before dividing, as ComfyUI does.
NORM_EPSILON = 1e-8
# SelfAttentionGuidance: blur kernel size and the attention mass above which a position is blurred.
SAG_KERNEL_SIZE = 9
SAG_THRESHOLD = 1.0


def _per_item(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


# ---- guidance -----------------------------------------------------------------------------------------

def rescale_cfg_function(multiplier: float):
    """RescaleCFG (Lin et al. 2023): guidance in v-prediction space, its per-item std brought back to the
    conditional prediction's, mixed with plain guidance by `multiplier`."""

    def rescale(args):
        x = args["input"]
        sigma = _per_item(args["sigma"], x)
        scale = (sigma ** 2 + 1.0) ** 0.5
        x_vp = x / (sigma ** 2 + 1.0)
        v_cond = (x_vp - args["cond_denoised"]) * scale / sigma
        v_uncond = (x_vp - args["uncond_denoised"]) * scale / sigma
        v_cfg = v_uncond + args["cond_scale"] * (v_cond - v_uncond)
        ratio = v_cond.std(dim=tuple(range(1, x.ndim)), keepdim=True) / v_cfg.std(dim=tuple(range(1, x.ndim)),
                                                                                   keepdim=True)
        v_final = multiplier * v_cfg * ratio + (1.0 - multiplier) * v_cfg
        denoised = x_vp - v_final * sigma / scale
        return x - denoised

    return rescale


def epsilon_scaling_function(scaling_factor: float):
    """Epsilon Scaling (Ning et al. 2023): the guided noise estimate divided by `scaling_factor`."""

    def scale(args):
        x = args["input"]
        return x - (x - args["denoised"]) / scaling_factor

    return scale


def cfg_zero_star_function():
    """CFG-Zero* (Fan et al. 2025): the unconditional prediction rescaled by the optimal projection of the
    conditional noise estimate onto it."""

    def zero_star(args):
        x, cond, uncond = args["input"], args["cond_denoised"], args["uncond_denoised"]
        positive = (x - cond).reshape(x.shape[0], -1)
        negative = (x - uncond).reshape(x.shape[0], -1)
        alpha = (positive * negative).sum(dim=1, keepdim=True) / ((negative ** 2).sum(dim=1, keepdim=True)
                                                                  + NORM_EPSILON)
        alpha = alpha.reshape([x.shape[0]] + [1] * (x.ndim - 1))
        return args["denoised"] + uncond * (alpha - 1.0) + args["cond_scale"] * uncond * (1.0 - alpha)

    return zero_star


def cfg_norm_function(strength: float):
    """CFGNorm: the guided result's per-position channel norm capped at the conditional prediction's."""

    def cfg_norm(args):
        guided = args["denoised"]
        cond_norm = torch.linalg.vector_norm(args["cond_denoised"], dim=1, keepdim=True)
        guided_norm = torch.linalg.vector_norm(guided, dim=1, keepdim=True)
        return guided * (cond_norm / (guided_norm + NORM_EPSILON)).clamp(0.0, 1.0) * strength

    return cfg_norm


def perp_neg_cfg_function(empty_conditioning, neg_scale: float):
    """Perp-Neg (Armandpour et al. 2023): guidance from the empty prompt's prediction, with only the part of the
    negative direction perpendicular to the positive one subtracted (scaled by neg_scale)."""
    from ..sampling.denoising import calc_cond_batch

    def perp_neg(args):
        x = args["input"]
        (empty,) = calc_cond_batch(args["model"], [empty_conditioning], x, args["sigma"], args["model_options"])
        positive = args["cond_denoised"] - empty
        negative = args["uncond_denoised"] - empty
        perpendicular = negative - (negative * positive).sum() / torch.linalg.vector_norm(positive) ** 2 * positive
        return x - (empty + args["cond_scale"] * (positive - perpendicular * neg_scale))

    return perp_neg


# ---- FreeU --------------------------------------------------------------------------------------------

def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the lowest spatial frequencies (a 2*threshold square around DC) of x by `scale`."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    mask = torch.ones(spectrum.shape, device=x.device)
    mask[..., height // 2 - threshold:height // 2 + threshold, width // 2 - threshold:width // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


def freeu_output_patch(model_channels: int, b1: float, b2: float, s1: float, s2: float, version: int = 1):
    """FreeU (Si et al. 2023) on the decoder blocks 4x and 2x model_channels wide: the first half of the
    backbone features scaled by b (v2: weighted by the normalised mean activation), the skip's lowest
    frequencies by s."""
    factors = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def patch(h, skip, transformer_options):
        found = factors.get(int(h.shape[1]))
        if found is None:
            return h, skip
        backbone, skip_scale = found
        half = h.shape[1] // 2
        if version == 1:
            weight = backbone
        else:
            mean = h.mean(1, keepdim=True)
            flat = mean.reshape(mean.shape[0], -1)
            low = flat.min(dim=-1).values.reshape(-1, 1, 1, 1)
            high = flat.max(dim=-1).values.reshape(-1, 1, 1, 1)
            weight = (backbone - 1.0) * ((mean - low) / (high - low)) + 1.0
        h = h.clone()
        h[:, :half] = h[:, :half] * weight
        return h, fourier_filter(skip, 1, skip_scale)

    return patch


# ---- Kohya Deep Shrink ------------------------------------------------------------------------------

def downscale_patches(block_number: int, factor: float, sigma_start: float, sigma_end: float,
                      downscale_method: str, upscale_method: str):
    """(input patch, output patch): the features after input block `block_number` shrunk by `factor` while
    sigma is in [sigma_end, sigma_start], and decoder features resized back to each skip's size."""
    from ..nodes.latents import upscale_latent as upscale

    def shrink(h, transformer_options):
        if transformer_options["block"][1] != block_number:
            return h
        sigma = float(transformer_options["sigmas"][0])
        if sigma_end <= sigma <= sigma_start:
            h = upscale(h, round(h.shape[-1] / factor), round(h.shape[-2] / factor), downscale_method, "disabled")
        return h

    def grow(h, skip, transformer_options):
        if h.shape[2] != skip.shape[2]:
            h = upscale(h, skip.shape[-1], skip.shape[-2], upscale_method, "disabled")
        return h, skip

    return shrink, grow


# ---- attention guidance ---------------------------------------------------------------------------------

def identity_attention(q, k, v, extra_options, mask=None):
    """PerturbedAttentionGuidance's self-attention: every position attends only to itself (output = v)."""
    return v


def with_attn1_replaced(model_options: dict, patch, block: str, number: int, transformer_index=None) -> dict:
    """A copy of model_options whose attn1 at (block, number[, transformer_index]) is `patch` (ComfyUI's
    set_model_options_patch_replace); the original dicts are not changed."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    replacements = dict(transformer_options.get("patches_replace", {}))
    key = (block, number) if transformer_index is None else (block, number, transformer_index)
    replacements["attn1"] = {**replacements.get("attn1", {}), key: patch}
    transformer_options["patches_replace"] = replacements
    options["transformer_options"] = transformer_options
    return options


def pag_post_cfg_function(scale: float):
    """PAG (Ahn et al. 2024): the positive prediction rerun with identity self-attention in the middle block
    pushes the result away from it: result + scale * (cond - perturbed)."""
    from ..sampling.denoising import calc_cond_batch

    def pag(args):
        if scale == 0:
            return args["denoised"]
        options = with_attn1_replaced(args["model_options"], identity_attention, "middle", 0)
        (perturbed,) = calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        return args["denoised"] + (args["cond_denoised"] - perturbed) * scale

    return pag


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel over a normalised kernel, edges reflected."""
    half = (kernel_size - 1) * 0.5
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma) ** 2)
    taps = (taps / taps.sum()).to(device=image.device, dtype=image.dtype)
    kernel = (taps[:, None] * taps[None, :]).expand(image.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(image, [pad] * 4, mode="reflect"), kernel, groups=image.shape[-3])


def _grid_rows(total: int, height: int, width: int) -> int:
    """Rows of the token grid of `total` tokens for a latent of height x width: the divisor of total nearest
    to sqrt(total * height / width), searching outwards as ComfyUI does."""
    guess = round(math.sqrt(height / width * total))
    for offset in range(math.floor(math.sqrt(total) / 2)):
        for rows in (guess + offset, max(1, guess - offset)):
            if total % rows == 0:
                return rows
    raise ValueError(f"SelfAttentionGuidance cannot lay {total} attention tokens out on a grid")


def blur_map(x0: torch.Tensor, attention: torch.Tensor, blur_sigma: float, threshold: float = SAG_THRESHOLD):
    """x0 blurred where the (head-averaged) attention a position receives exceeds `threshold`."""
    batch, _, height, width = x0.shape
    tokens = attention.shape[-1]
    attention = attention.reshape(batch, -1, tokens, tokens)
    mask = attention.mean(1).sum(1) > threshold
    rows = _grid_rows(tokens, height, width)
    mask = mask.reshape(batch, rows, tokens // rows).unsqueeze(1).to(attention.dtype)
    mask = F.interpolate(mask, (height, width))
    blurred = gaussian_blur(x0, SAG_KERNEL_SIZE, blur_sigma)
    return blurred * mask + x0 * (1 - mask)


def attention_with_scores(q, k, v, heads: int):
    """Plain softmax attention that also returns the probabilities, [batch * heads, tokens, tokens]."""
    batch, tokens, inner = q.shape
    dim_head = inner // heads

    def split(t):
        return t.reshape(batch, -1, heads, dim_head).transpose(1, 2).reshape(batch * heads, -1, dim_head)

    scores = (split(q).float() @ split(k).float().transpose(1, 2) * dim_head ** -0.5).softmax(dim=-1)
    out = (scores.to(v.dtype) @ split(v)).reshape(batch, heads, tokens, dim_head).transpose(1, 2)
    return out.reshape(batch, tokens, inner), scores


def self_attention_guidance(scale: float, blur_sigma: float):
    """(attn1 replacement for the middle block, post-cfg function) of SAG (Hong et al. 2023): the negative
    prediction's middle-block self-attention picks regions of its x0 to blur; the model rerun on the blurred
    x0, re-noised, gives the guidance direction."""
    from ..sampling.denoising import calc_cond_batch

    recorded = {}

    def record(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        kinds = extra_options["cond_or_uncond"]
        out, scores = attention_with_scores(q, k, v, heads)
        if 1 in kinds:
            per_chunk = q.shape[0] // len(kinds) * heads
            index = kinds.index(1)
            recorded["scores"] = scores[per_chunk * index:per_chunk * (index + 1)]
        return out

    def guide(args):
        result = args["denoised"]
        scores = recorded.get("scores")
        if min(result.shape[2:]) <= 4 or scores is None or args["uncond"] is None:
            return result
        uncond_pred, x = args["uncond_denoised"], args["input"]
        degraded = blur_map(uncond_pred, scores, blur_sigma)
        (rerun,) = calc_cond_batch(args["model"], [args["uncond"]], degraded + x - uncond_pred, args["sigma"],
                                   args["model_options"])
        return result + (degraded - rerun) * scale

    return record, guide


# ---- HyperTile -----------------------------------------------------------------------------------------

def random_divisor(value: int, min_value: int, max_options: int = 1) -> int:
    """value // d for a divisor d >= min_value among the first `max_options`, drawn with torch's global RNG
    (ComfyUI draws from [0, options - 1), so the last option is never taken)."""
    min_value = min(min_value, value)
    divisors = [d for d in range(min_value, value + 1) if value % d == 0]
    counts = [value // d for d in divisors[:max_options]]
    index = int(torch.randint(low=0, high=len(counts) - 1, size=(1,)).item()) if len(counts) > 1 else 0
    return counts[index]


def hypertile_patches(tile_size: int, swap_size: int, max_depth: int, scale_depth: bool):
    """(attn1 patch, attn1 output patch) of HyperTile: self-attention queries at the first max_depth+1
    resolutions split into tiles of about tile_size pixels, each tile its own batch item; keys and values are
    left as they are, and the attention reshapes them to the tiled batch just as ComfyUI's does."""
    latent_tile = max(32, tile_size) // 8
    state = {}

    def tile(n, context, value, extra_options):
        shape = extra_options["original_shape"]
        levels = [(shape[-2] / 2 ** i) * (shape[-1] / 2 ** i) for i in range(max_depth + 1)]
        tokens = n.shape[-2]
        if tokens not in levels:
            return n, context, value
        aspect = shape[-1] / shape[-2]
        hw = n.size(1)
        rows, cols = round(math.sqrt(hw * aspect)), round(math.sqrt(hw / aspect))
        factor = 2 ** levels.index(tokens) if scale_depth else 1
        tiles_down = random_divisor(rows, latent_tile * factor, swap_size)
        tiles_across = random_divisor(cols, latent_tile * factor, swap_size)
        if tiles_down * tiles_across > 1:
            batch, _, channels = n.shape
            n = (n.reshape(batch, tiles_down, rows // tiles_down, tiles_across, cols // tiles_across, channels)
                 .permute(0, 1, 3, 2, 4, 5).reshape(batch * tiles_down * tiles_across, -1, channels))
            state["tiles"] = (tiles_down, tiles_across, rows, cols)
        return n, context, value

    def untile(out, extra_options):
        tiles = state.pop("tiles", None)
        if tiles is None:
            return out
        tiles_down, tiles_across, rows, cols = tiles
        channels = out.shape[-1]
        batch = out.shape[0] // (tiles_down * tiles_across)
        out = out.reshape(batch, tiles_down, tiles_across, rows // tiles_down, cols // tiles_across, channels)
        return out.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, channels)

    return tile, untile
