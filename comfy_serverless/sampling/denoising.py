"""The denoiser a sampler calls: model parameterisation and classifier-free guidance over ComfyUI conditioning.

* :class:`ModelSampling` turns a raw UNet (eps- or v-prediction) into a denoiser D(x, sigma) -> x_0.
* :class:`CFGDenoiser` (via :func:`cfg_denoiser`) runs every active conditioning entry, positive and negative,
  batched into as few UNet calls as possible, composes them per area/mask/strength, and applies guidance.

UNet contract: ``unet_apply(x, timesteps, context=..., **model_kwargs) -> model_output`` where ``x`` is already
scaled by 1/sqrt(sigma²+1), ``timesteps`` is a float tensor of table indices (one per batch item) and
``context`` the batched cross-attention conditioning.

Conditioning: a list of entries in ComfyUI's CONDITIONING form ``[tensor, options]`` (a bare tensor means
no options).  Options understood: ``strength``, ``start_percent`` / ``end_percent``, ``area`` (latent units
``(h, w, y, x)`` or ``("percentage", h, w, y, x)``), ``mask`` with ``mask_strength`` and
``set_area_to_bounds``, and ``model_kwargs`` (extra per-entry UNet inputs, e.g. SDXL's ``y``).  An
``encode_extra(options, latent_shape) -> dict`` hook can compute such inputs instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .schedules import SD_BETA_END, SD_BETA_START, SD_TRAIN_TIMESTEPS, DiscreteSchedule

UnetApply = Callable[..., torch.Tensor]

PREDICTION_TYPES = ("eps", "v_prediction")

# Width, in latent pixels, of the linear fade at the inner edges of an area without a mask.
AREA_FEATHER = 8
# Minimum extent of an area derived from mask bounds.
MIN_MASK_AREA = 8
# Start value of the per-pixel weight sums, so pixels no entry covers divide to 0 instead of NaN.
EMPTY_WEIGHT = 1e-37
# Largest token-count ratio for which conditionings of different lengths are padded (by repetition) to batch.
MAX_CONTEXT_REPEAT = 4


def per_item_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


class ModelSampling(DiscreteSchedule):
    """A discrete-time model's noise table plus its output parameterisation (eps or v), ComfyUI-compatible.

    Sampling happens in the variance-exploding scale x = x_0 + sigma * eps; the UNet was trained in the
    variance-preserving scale, which is x / sqrt(sigma² + 1).
    """

    def __init__(self, prediction_type: str = "eps", *, beta_start: float = SD_BETA_START,
                 beta_end: float = SD_BETA_END, num_timesteps: int = SD_TRAIN_TIMESTEPS,
                 betas: Optional[torch.Tensor] = None, sigma_data: float = 1.0):
        if prediction_type == "v":
            prediction_type = "v_prediction"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        super().__init__(beta_start, beta_end, num_timesteps, betas)
        self.prediction_type = prediction_type
        self.sigma_data = sigma_data

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The UNet's input: x rescaled to unit variance (c_in of Karras et al.)."""
        sigma = per_item_view(sigma, x)
        return x / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        """x_0 estimate from the UNet output and the (unscaled) noisy input."""
        sigma = per_item_view(sigma, model_output)
        if self.prediction_type == "eps":
            return model_input - model_output * sigma
        # v = alpha*eps - sigma_vp*x_0 in the VP scale; solving for x_0 in the VE scale gives:
        total = sigma ** 2 + self.sigma_data ** 2
        return (model_input * self.sigma_data ** 2 / total
                - model_output * sigma * self.sigma_data / total ** 0.5)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The starting point: the latent noised to ``sigma``.  At full denoise ComfyUI scales the noise by
        sqrt(1 + sigma²) (the VP prior's spread, seen in the VE scale) rather than sigma."""
        sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
        sigma = sigma.reshape(sigma.shape[:1] + (1,) * (noise.ndim - 1)) if sigma.ndim else sigma
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent

    def apply_model(self, unet_apply: UnetApply, x: torch.Tensor, sigma: torch.Tensor,
                    model_dtype: Optional[torch.dtype] = None, **model_kwargs) -> torch.Tensor:
        """Denoise ``x`` at ``sigma`` (one per batch item) with a raw UNet; returns float32 x_0."""
        x_in = self.calculate_input(sigma, x)
        timesteps = self.timestep(sigma).float()
        if model_dtype is not None:
            x_in = x_in.to(model_dtype)
            model_kwargs = {k: v.to(model_dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in model_kwargs.items()}
        output = unet_apply(x_in, timesteps, **model_kwargs).float()
        return self.calculate_denoised(sigma, output, x)


# --------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------

@dataclass
class ConditioningEntry:
    """One conditioning entry: the cross-attention tensor, its options, and extra UNet inputs."""
    context: Optional[torch.Tensor]
    options: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)


def _normalise_conditioning(conditioning) -> list[ConditioningEntry]:
    if conditioning is None:
        return []
    entries = []
    for item in conditioning:
        if isinstance(item, ConditioningEntry):
            entries.append(item)
        elif torch.is_tensor(item):
            entries.append(ConditioningEntry(item))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            options = dict(item[1] or {})
            entries.append(ConditioningEntry(item[0], options, dict(options.get("model_kwargs", {}))))
        else:
            raise TypeError(f"conditioning entries must be [tensor, options] pairs, got {type(item).__name__}")
    return entries


@dataclass
class _ResolvedEntry:
    """An entry ready for a given latent shape: region (h, w, y, x) clipped to the latent, weights, range."""
    entry: ConditioningEntry
    area: Optional[tuple]  # (h, w, y, x) in latent units as requested, None = whole latent
    mask: Optional[torch.Tensor]  # [B, H, W] at latent resolution, already times mask_strength
    strength: float
    sigma_start: Optional[float]
    sigma_end: Optional[float]


def _mask_bounds(mask: torch.Tensor) -> Optional[tuple]:
    """Bounding box (h, w, y, x) of the non-zero pixels of any mask in the batch, at least 8 wide; None if empty."""
    occupied = mask.abs().amax(dim=0) != 0
    if not bool(occupied.any()):
        return None
    rows = torch.nonzero(occupied.any(dim=1)).flatten()
    cols = torch.nonzero(occupied.any(dim=0)).flatten()
    y, x = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) - y + 1, int(cols[-1]) - x + 1
    return (max(MIN_MASK_AREA, h), max(MIN_MASK_AREA, w), y, x)


def _resolve_entry(entry: ConditioningEntry, height: int, width: int, device,
                   model_sampling: DiscreteSchedule) -> _ResolvedEntry:
    options = entry.options
    area = options.get("area")
    if area is not None and area[0] == "percentage":
        area = (max(1, round(area[1] * height)), max(1, round(area[2] * width)),
                round(area[3] * height), round(area[4] * width))
    mask = options.get("mask")
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.float32, device=device)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[1:]) != (height, width):
            mask = torch.nn.functional.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear",
                                                   align_corners=False).squeeze(1)
        if options.get("set_area_to_bounds", False):
            area = _mask_bounds(mask) or (MIN_MASK_AREA, MIN_MASK_AREA, 0, 0)
        mask = mask * float(options.get("mask_strength", 1.0))
    if area is not None:
        area = tuple(int(v) for v in area)
    sigma_start = sigma_end = None
    if "start_percent" in options:
        sigma_start = model_sampling.percent_to_sigma(float(options["start_percent"]))
    if "end_percent" in options:
        sigma_end = model_sampling.percent_to_sigma(float(options["end_percent"]))
    return _ResolvedEntry(entry, area, mask, float(options.get("strength", 1.0)), sigma_start, sigma_end)


def _area_contains(outer: Optional[tuple], inner: tuple) -> bool:
    if outer is None:
        return True
    oh, ow, oy, ox = outer
    ih, iw, iy, ix = inner
    return iy >= oy and ix >= ox and iy + ih <= oy + oh and ix + iw <= ox + ow


def _add_matching_areas(sources: list[_ResolvedEntry], targets: list[_ResolvedEntry]) -> None:
    """For each area-restricted source entry, give ``targets`` an entry over the same area (ComfyUI does
    this so guidance in that area compares like with like): the source's options with the conditioning of
    the smallest target entry containing the area."""
    for source in list(sources):
        if source.area is None:
            continue
        smallest = None
        for candidate in targets:
            if not _area_contains(candidate.area, source.area):
                continue
            if smallest is None or (smallest.area is None and candidate.area is not None):
                smallest = candidate
            elif (candidate.area is not None
                  and smallest.area[0] * smallest.area[1] > candidate.area[0] * candidate.area[1]):
                smallest = candidate
        if smallest is None or smallest.area == source.area:
            continue
        donor = smallest.entry
        copy = ConditioningEntry(donor.context, source.entry.options, dict(donor.model_kwargs))
        targets.append(_ResolvedEntry(copy, source.area, source.mask, source.strength,
                                      source.sigma_start, source.sigma_end))


def _feathered_weights(shape, region, height: int, width: int, device) -> torch.Tensor:
    """Ones over the region, fading linearly over 8 pixels at edges that lie inside the latent."""
    weights = torch.ones(shape, device=device)
    y0, y1, x0, x1 = region
    rows, cols = y1 - y0, x1 - x0
    for t in range(AREA_FEATHER):
        fade = (t + 1) / AREA_FEATHER
        if y0 != 0 and t < rows:
            weights[:, :, t, :] *= fade
        if y1 < height and t < rows:
            weights[:, :, rows - 1 - t, :] *= fade
        if x0 != 0 and t < cols:
            weights[:, :, :, t] *= fade
        if x1 < width and t < cols:
            weights[:, :, :, cols - 1 - t] *= fade
    return weights


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] < batch:
        tensor = tensor.repeat((math.ceil(batch / tensor.shape[0]),) + (1,) * (tensor.ndim - 1))
    return tensor[:batch]


@dataclass
class _Chunk:
    """One entry's slice of the batch for one UNet call."""
    kind: int  # 0 = positive, 1 = negative
    region: tuple  # (y0, y1, x0, x1)
    x: torch.Tensor
    weights: torch.Tensor
    context: Optional[torch.Tensor]
    model_kwargs: dict


def _contexts_concatenable(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape == b.shape:
        return True
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= MAX_CONTEXT_REPEAT


def _chunks_concatenable(a: _Chunk, b: _Chunk) -> bool:
    if a.x.shape != b.x.shape or a.model_kwargs.keys() != b.model_kwargs.keys():
        return False
    for key, value in a.model_kwargs.items():
        other = b.model_kwargs[key]
        if torch.is_tensor(value) != torch.is_tensor(other):
            return False
        if torch.is_tensor(value) and value.shape != other.shape:
            return False
        if not torch.is_tensor(value) and value != other:
            return False
    return _contexts_concatenable(a.context, b.context)


def _concat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    # Repeating tokens does not change cross-attention's result, so shorter prompts are tiled to a common length.
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


class CFGDenoiser:
    """Denoiser D(x, sigma) with classifier-free guidance over ComfyUI conditioning lists.

    D = D_neg + cfg * (D_pos - D_neg), where D_pos / D_neg are the weighted compositions of the active
    positive / negative entries.  With cfg == 1 the negative side is skipped entirely.
    """

    def __init__(self, unet_apply: UnetApply, positive, negative, cfg: float, *,
                 model_sampling: Optional[ModelSampling] = None,
                 encode_extra: Optional[Callable[[dict, torch.Size], dict]] = None,
                 model_dtype: Optional[torch.dtype] = None, max_batch_chunks: Optional[int] = None,
                 model_options: Optional[dict] = None):
        self.unet_apply = unet_apply
        self.model_options = model_options or {}
        self.positive = _normalise_conditioning(positive)
        self.negative = _normalise_conditioning(negative)
        self.cfg = float(cfg)
        self.model_sampling = model_sampling if model_sampling is not None else ModelSampling()
        self.encode_extra = encode_extra
        self.model_dtype = model_dtype
        self.max_batch_chunks = max_batch_chunks
        self._resolved: dict[tuple, tuple[list[_ResolvedEntry], list[_ResolvedEntry]]] = {}
        self.unet_calls = 0

    @property
    def skips_negative(self) -> bool:
        return math.isclose(self.cfg, 1.0)

    def _resolve(self, x: torch.Tensor):
        key = (tuple(x.shape), x.device)
        if key not in self._resolved:
            height, width = x.shape[-2], x.shape[-1]
            sides = []
            for entries in (self.positive, self.negative):
                resolved = []
                for entry in entries:
                    if self.encode_extra is not None:
                        extra = self.encode_extra(entry.options, x.shape) or {}
                        entry = ConditioningEntry(entry.context, entry.options, {**entry.model_kwargs, **extra})
                    resolved.append(_resolve_entry(entry, height, width, x.device, self.model_sampling))
                sides.append(resolved)
            positive, negative = sides
            _add_matching_areas(positive, negative)
            _add_matching_areas(negative, positive)
            self._resolved[key] = (positive, negative)
        return self._resolved[key]

    def _chunk(self, kind: int, resolved: _ResolvedEntry, x: torch.Tensor, sigma: torch.Tensor) -> Optional[_Chunk]:
        current = float(sigma.reshape(-1)[0])
        if resolved.sigma_start is not None and current > resolved.sigma_start:
            return None
        if resolved.sigma_end is not None and current < resolved.sigma_end:
            return None
        height, width = x.shape[-2], x.shape[-1]
        if resolved.area is None:
            region = (0, height, 0, width)
        else:
            h, w, y, x0 = resolved.area
            region = (y, min(y + h, height), x0, min(x0 + w, width))
        y0, y1, x0, x1 = region
        x_part = x[:, :, y0:y1, x0:x1]
        if resolved.mask is not None:
            mask = repeat_to_batch(resolved.mask[:, y0:y1, x0:x1], x.shape[0]).to(x.dtype)
            weights = mask.unsqueeze(1).expand(-1, x.shape[1], -1, -1) * resolved.strength
        else:
            weights = _feathered_weights(x_part.shape, region, height, width, x.device) * resolved.strength
        entry = resolved.entry
        context = entry.context
        if context is not None:
            context = repeat_to_batch(context.to(x.device), x.shape[0])
        model_kwargs = {k: repeat_to_batch(v.to(x.device), x.shape[0]) if torch.is_tensor(v) else v
                        for k, v in entry.model_kwargs.items()}
        return _Chunk(kind, region, x_part, weights, context, model_kwargs)

    def _run_batch(self, chunks: list[_Chunk], sigma: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([c.x for c in chunks])
        sigmas = torch.cat([sigma] * len(chunks))
        kwargs: dict[str, Any] = {}
        if chunks[0].context is not None:
            kwargs["context"] = _concat_contexts([c.context for c in chunks])
        for key, value in chunks[0].model_kwargs.items():
            kwargs[key] = torch.cat([c.model_kwargs[key] for c in chunks]) if torch.is_tensor(value) else value
        self.unet_calls += 1
        denoised = self.model_sampling.apply_model(self.unet_apply, x, sigmas, model_dtype=self.model_dtype,
                                                   **kwargs)
        return list(denoised.chunk(len(chunks)))

    def predictions(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The composed positive and negative x_0 estimates (negative None when cfg == 1)."""
        positive, negative = self._resolve(x)
        pending = [c for c in (self._chunk(0, r, x, sigma) for r in positive) if c is not None]
        if not self.skips_negative:
            pending += [c for c in (self._chunk(1, r, x, sigma) for r in negative) if c is not None]
        totals = [torch.zeros_like(x), torch.zeros_like(x)]
        weight_sums = [torch.full_like(x, EMPTY_WEIGHT), torch.full_like(x, EMPTY_WEIGHT)]
        while pending:
            batch = [c for c in pending if _chunks_concatenable(c, pending[0])]
            if self.max_batch_chunks:
                batch = batch[:self.max_batch_chunks]
            pending = [c for c in pending if not any(c is b for b in batch)]
            for chunk, denoised in zip(batch, self._run_batch(batch, sigma)):
                y0, y1, x0, x1 = chunk.region
                totals[chunk.kind][:, :, y0:y1, x0:x1] += denoised * chunk.weights
                weight_sums[chunk.kind][:, :, y0:y1, x0:x1] += chunk.weights
        positive_out = totals[0] / weight_sums[0]
        negative_out = None if self.skips_negative else totals[1] / weight_sums[1]
        return positive_out, negative_out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        positive_out, negative_out = self.predictions(x, sigma)
        if negative_out is None:
            negative_out = torch.zeros_like(positive_out)
        return negative_out + (positive_out - negative_out) * self.cfg


def cfg_denoiser(unet_apply: UnetApply, cond, uncond, cfg: float, **options) -> CFGDenoiser:
    """Build the guided denoiser ``D(x, sigma)``; ``options`` as for :class:`CFGDenoiser`."""
    return CFGDenoiser(unet_apply, cond, uncond, cfg, **options)
