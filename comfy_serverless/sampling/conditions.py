"""ComfyUI conditioning, resolved for one latent shape: entries, areas, masks, strengths, timestep ranges, and
the chunks of a UNet batch they become.

Options understood: ``strength``, ``start_percent`` / ``end_percent``, ``area`` (latent units ``(h, w, y, x)`` or
``("percentage", h, w, y, x)``), ``mask`` with ``mask_strength`` and ``set_area_to_bounds``, ``control`` (a
ControlNet-style object, see denoising.CFGDenoiser) and ``model_kwargs`` (extra per-entry UNet inputs, e.g. SDXL's
``y``), ``hooks`` (a HOOKS group of weight patches, models/hooks.py; chunks with other hooks never share a
UNet call), ``default`` (the entry fills what the other entries leave uncovered, see denoising) and
``clip_start_percent`` / ``clip_end_percent`` (a scheduled CLIP encoding's range, intersected with the entry's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..models.hooks import hooks_key
from .schedules import DiscreteSchedule

# Width, in latent pixels, of the linear fade at the inner edges of an area without a mask.
AREA_FEATHER = 8
# Minimum extent of an area derived from mask bounds.
MIN_MASK_AREA = 8
# Largest token-count ratio for which conditionings of different lengths are padded (by repetition) to batch.
MAX_CONTEXT_REPEAT = 4


@dataclass
class ConditioningEntry:
    """One conditioning entry: the cross-attention tensor, its options, and extra UNet inputs."""
    context: Optional[torch.Tensor]
    options: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)


def normalise_conditioning(conditioning) -> list[ConditioningEntry]:
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
class ResolvedEntry:
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


def resolve_entry(entry: ConditioningEntry, height: int, width: int, device,
                   model_sampling: DiscreteSchedule) -> ResolvedEntry:
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
    start, end = options.get("start_percent"), options.get("end_percent")
    if "clip_start_percent" in options:  # encoded for part of the run only: keep to both ranges
        start = max(float(options["clip_start_percent"]), float(start if start is not None else 0.0))
        end = min(float(options.get("clip_end_percent", 1.0)), float(end if end is not None else 1.0))
    if start is not None:
        sigma_start = model_sampling.percent_to_sigma(float(start))
    if end is not None:
        sigma_end = model_sampling.percent_to_sigma(float(end))
    return ResolvedEntry(entry, area, mask, float(options.get("strength", 1.0)), sigma_start, sigma_end)


def _area_contains(outer: Optional[tuple], inner: tuple) -> bool:
    if outer is None:
        return True
    oh, ow, oy, ox = outer
    ih, iw, iy, ix = inner
    return iy >= oy and ix >= ox and iy + ih <= oy + oh and ix + iw <= ox + ow


def add_matching_areas(sources: list[ResolvedEntry], targets: list[ResolvedEntry]) -> None:
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
        targets.append(ResolvedEntry(copy, source.area, source.mask, source.strength,
                                      source.sigma_start, source.sigma_end))


def feathered_weights(shape, region, height: int, width: int, device) -> torch.Tensor:
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
class Chunk:
    """One entry's slice of the batch for one UNet call."""
    kind: int  # index of the conditioning list in the call: 0 = positive, 1 = negative, ...
    region: tuple  # (y0, y1, x0, x1)
    x: torch.Tensor
    weights: torch.Tensor
    context: Optional[torch.Tensor]
    model_kwargs: dict
    control: Any = None  # the entry's ControlNet-style object; chunks batch together only with the same one
    gligen: Any = None  # the entry's GLIGEN boxes ("gligen" option); likewise
    hooks: Any = None  # the entry's HOOKS (weight patches for its UNet call); likewise, by hooks_key


def _contexts_concatenable(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape == b.shape:
        return True
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= MAX_CONTEXT_REPEAT


def chunks_concatenable(a: Chunk, b: Chunk) -> bool:
    if a.control is not b.control or a.gligen is not b.gligen or hooks_key(a.hooks) != hooks_key(b.hooks):
        return False
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


def concat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    # Repeating tokens does not change cross-attention's result, so shorter prompts are tiled to a common length.
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])
