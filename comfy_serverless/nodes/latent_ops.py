"""Latent arithmetic, batching and latent operations (ComfyUI's latent/advanced, latent/batch and
latent/advanced/operations nodes, plus LatentCompositeMasked).

Nodes copy the input LATENT dict and replace "samples", so noise_mask / batch_index ride along as in ComfyUI.
A LATENT_OPERATION is a callable `operation(latent=tensor [B, C, H, W]) -> tensor` (ComfyUI's convention,
which packs also call). Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

MAX_RESOLUTION = 16384
# Spatial axes counted from the end: x is width, y height, t the frame axis of video latents [B, C, T, H, W].
AXES_FROM_END = {"x": 1, "y": 2, "t": 3}
# Added to vector norms before dividing, as ComfyUI does, so all-zero cells stay finite.
SHARPEN_EPSILON = 1e-6
TONEMAP_EPSILON = 1e-10
# Reinhard's white point: this many standard deviations above the mean magnitude.
TONEMAP_SPREAD = 5.0


def _repeat_to_batch(tensor, batch: int):
    from .images import _repeat_to_batch

    return _repeat_to_batch(tensor, batch)


def _shaped_like(target_shape, latent, repeat_batch: bool = True):
    """`latent` resized (bilinear, centre crop) to the target's channel-and-space shape, and cut or cycled
    to its batch size (ComfyUI's reshape for latent arithmetic)."""
    from .images import upscale

    if tuple(latent.shape[1:]) != tuple(target_shape[1:]):
        if latent.shape[1] != target_shape[1]:
            raise ValueError(f"a latent of {latent.shape[1]} channels cannot be combined with one of "
                             f"{target_shape[1]}: they come from different model families")
        latent = upscale(latent, target_shape[-1], target_shape[-2], "bilinear", "center")
    return _repeat_to_batch(latent, target_shape[0]) if repeat_batch else latent


def _vector_norm(latent):
    """Length of each cell's channel vector, kept as a channel axis: [B, 1, H, W]."""
    import torch

    return torch.linalg.vector_norm(latent, dim=1, keepdim=True)


def _with_samples(latent: dict, samples) -> dict:
    out = dict(latent)
    out["samples"] = samples
    return out


def _combo(options: list[str], **extra) -> tuple:
    return ("COMBO", {"options": options, "multiselect": False, **extra})


class LatentAdd:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    def op(self, samples1, samples2):
        first = samples1["samples"]
        return (_with_samples(samples1, first + _shaped_like(first.shape, samples2["samples"])),)


class LatentSubtract(LatentAdd):
    def op(self, samples1, samples2):
        first = samples1["samples"]
        return (_with_samples(samples1, first - _shaped_like(first.shape, samples2["samples"])),)


class LatentMultiply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    def op(self, samples, multiplier):
        return (_with_samples(samples, samples["samples"] * multiplier),)


class LatentInterpolate:
    """Blends directions and lengths separately: each cell's channel vector is normalised, the unit vectors
    are mixed by `ratio` and renormalised, and the length is the same mix of the two lengths. (ComfyUI divides by
    norms without a kept axis, which matches this for one latent and fails or mixes items for larger batches.)"""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples1": ("LATENT",),
            "samples2": ("LATENT",),
            "ratio": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    def op(self, samples1, samples2, ratio):
        import torch

        first = samples1["samples"]
        second = _shaped_like(first.shape, samples2["samples"])
        length1, length2 = _vector_norm(first), _vector_norm(second)
        mixed = torch.nan_to_num(first / length1) * ratio + torch.nan_to_num(second / length2) * (1.0 - ratio)
        direction = torch.nan_to_num(mixed / _vector_norm(mixed))
        return (_with_samples(samples1, direction * (length1 * ratio + length2 * (1.0 - ratio))),)


class LatentConcat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples1": ("LATENT",),
            "samples2": ("LATENT",),
            "dim": _combo(["x", "-x", "y", "-y", "t", "-t"]),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    def op(self, samples1, samples2, dim):
        import torch

        axis = AXES_FROM_END.get(dim.lstrip("-"))
        if axis is None:
            raise ValueError(f"dim must be one of x, -x, y, -y, t, -t, got {dim!r}")
        first = samples1["samples"]
        second = _repeat_to_batch(samples2["samples"], first.shape[0])
        parts = (second, first) if dim.startswith("-") else (first, second)  # a minus puts samples2 first
        try:
            joined = torch.cat(parts, dim=-axis)
        except RuntimeError as error:
            raise ValueError(f"cannot join latents of shapes {tuple(first.shape)} and {tuple(second.shape)} "
                             f"along {dim.lstrip('-')}: the other axes must match") from error
        return (_with_samples(samples1, joined),)


class LatentCut:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "dim": _combo(["x", "y", "t"]),
            "index": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "amount": ("INT", {"default": 1, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    def op(self, samples, dim, index, amount):
        latent = samples["samples"]
        if dim not in AXES_FROM_END:
            raise ValueError(f"dim must be one of x, y, t, got {dim!r}")
        axis = latent.ndim - AXES_FROM_END[dim]
        size = latent.shape[axis]
        # Out-of-range starts are clamped to the axis; a negative index counts from the end.
        if index >= 0:
            index = min(index, size - 1)
            amount = min(size - index, amount)
        else:
            index = max(index, -size)
            amount = min(-index, amount)
        return (_with_samples(samples, latent.narrow(axis, index, amount)),)


class LatentBatchSeedBehavior:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "seed_behavior": _combo(["random", "fixed"], default="fixed"),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    def op(self, samples, seed_behavior):
        out = dict(samples)
        if seed_behavior == "random":  # every item its own noise: drop the indices
            out.pop("batch_index", None)
        elif seed_behavior == "fixed":  # every item the first item's noise
            first = samples.get("batch_index", [0])[0]
            out["batch_index"] = [first] * samples["samples"].shape[0]
        else:
            raise ValueError(f"seed_behavior must be 'random' or 'fixed', got {seed_behavior!r}")
        return (out,)


class LatentBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/batch"

    def op(self, samples1, samples2):
        import torch

        first = samples1["samples"]
        second = _shaped_like(first.shape, samples2["samples"], repeat_batch=False)
        out = _with_samples(samples1, torch.cat((first, second), dim=0))
        # Each item keeps the noise it had in its own batch; samples1's other keys (noise_mask) carry over.
        out["batch_index"] = (samples1.get("batch_index", list(range(first.shape[0])))
                              + samples2.get("batch_index", list(range(second.shape[0]))))
        return (out,)


def _batch_parts(latent: dict, offset: int):
    """A LATENT's samples, its noise mask at pixel resolution for every item (ones when it has none), and its
    items' noise indices (counted on from `offset` when it has none)."""
    import torch
    import torch.nn.functional as F

    samples = latent["samples"]
    pixel_size = (samples.shape[-2] * 8, samples.shape[-1] * 8)
    mask = latent.get("noise_mask")
    if mask is None:
        mask = torch.ones((samples.shape[0], 1) + pixel_size)
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:])).float()
    if tuple(mask.shape[-2:]) != pixel_size:
        mask = F.interpolate(mask, size=pixel_size, mode="bilinear")
    if mask.shape[0] < samples.shape[0]:
        mask = _repeat_to_batch(mask, samples.shape[0])
    indices = list(latent.get("batch_index", range(offset, offset + samples.shape[0])))
    return samples, mask, indices


class RebatchLatents:
    """Regroups a list of latent batches into batches of `batch_size`, in order. Latents of another size start
    a new batch. Each output has its noise indices and, unless it is all ones, its noise mask (pixel
    resolution; ComfyUI fails on inputs whose masks differ in size, this resizes them)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latents": ("LATENT",),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("LATENT",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "rebatch"
    CATEGORY = "latent/batch"

    def rebatch(self, latents, batch_size):
        import torch

        size = batch_size[0]  # every input arrives as a list
        runs: list[list[tuple]] = []  # consecutive inputs of one spatial size
        offset = 0
        for latent in latents:
            parts = _batch_parts(latent, offset)
            offset += len(parts[2])
            if runs and runs[-1][0][0].shape[-2:] == parts[0].shape[-2:]:
                runs[-1].append(parts)
            else:
                runs.append([parts])
        out = []
        for run in runs:
            samples = torch.cat([p[0] for p in run])
            masks = torch.cat([p[1] for p in run])
            indices = [i for p in run for i in p[2]]
            for start in range(0, samples.shape[0], size):
                batch = {"samples": samples[start:start + size], "batch_index": indices[start:start + size]}
                mask = masks[start:start + size]
                if float(mask.mean()) != 1.0:
                    batch["noise_mask"] = mask
                out.append(batch)
        return (out,)


class LatentCompositeMasked:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "destination": ("LATENT",),
                "source": ("LATENT",),
                "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
                "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
                "resize_source": ("BOOLEAN", {"default": False}),
            },
            "optional": {"mask": ("MASK",)},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"
    CATEGORY = "latent"

    def composite(self, destination, source, x, y, resize_source, mask=None):
        from .images import ImageCompositeMasked

        target, pasted = destination["samples"], source["samples"]
        if target.shape[1] != pasted.shape[1]:
            raise ValueError(f"source latent has {pasted.shape[1]} channels, destination {target.shape[1]}: "
                             "they come from different model families")
        # The image node's compositing in latent cells (x, y are pixels: 8 per cell), channels last.
        (result,) = ImageCompositeMasked().composite(target.movedim(1, -1), pasted.movedim(1, -1), x // 8, y // 8,
                                                     resize_source, mask)
        return (_with_samples(destination, result.movedim(-1, 1)),)


class SharpenOperation:
    """Unsharp mask on each cell's unit channel vector (its direction), keeping its length."""

    def __init__(self, radius: int, sigma: float, alpha: float):
        self.radius, self.sigma, self.alpha = radius, sigma, alpha

    def __call__(self, latent, **kwargs):
        import torch.nn.functional as F

        from .images import _gaussian_kernel

        radius = self.radius
        if radius >= min(latent.shape[-2:]):
            raise ValueError(f"sharpen_radius {radius} needs a latent larger than {radius} cells on each side; "
                             f"this one is {latent.shape[-2]} x {latent.shape[-1]}")
        length = _vector_norm(latent) + SHARPEN_EPSILON
        unit = latent / length
        kernel = _gaussian_kernel(2 * radius + 1, self.sigma).to(latent.device, latent.dtype) * (-10.0 * self.alpha)
        # The centre tap makes the kernel sum to 1: flat areas are left as they are.
        kernel[radius, radius] = kernel[radius, radius] - kernel.sum() + 1.0
        channels = latent.shape[1]
        padded = F.pad(unit, (radius, radius, radius, radius), mode="reflect")
        sharpened = F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)
        return length * sharpened


class TonemapReinhardOperation:
    """Reinhard's curve m / (1 + m) on each cell's vector length, with the white point at mean + 5 std of the
    lengths (per item) times `multiplier`; directions are kept."""

    def __init__(self, multiplier: float):
        self.multiplier = multiplier

    def __call__(self, latent, **kwargs):
        length = _vector_norm(latent) + TONEMAP_EPSILON
        white = (length.std(dim=(1, 2, 3), keepdim=True) * TONEMAP_SPREAD
                 + length.mean(dim=(1, 2, 3), keepdim=True)) * self.multiplier
        # (l / w) / (l / w + 1) * w, written so that a white point of 0 (multiplier 0) gives 0, not NaN.
        return latent / length * (length * white / (length + white))


class LatentOperationSharpen:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sharpen_radius": ("INT", {"default": 9, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            "alpha": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 5.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT_OPERATION",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    def op(self, sharpen_radius, sigma, alpha):
        return (SharpenOperation(sharpen_radius, sigma, alpha),)


class LatentOperationTonemapReinhard:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"multiplier": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01})}}

    RETURN_TYPES = ("LATENT_OPERATION",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    def op(self, multiplier):
        return (TonemapReinhardOperation(multiplier),)


class LatentApplyOperation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "operation": ("LATENT_OPERATION",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    def op(self, samples, operation):
        return (_with_samples(samples, operation(latent=samples["samples"])),)


class GuidanceOperation:
    """A pre-CFG function: applies a latent operation to the guidance direction (positive minus negative x_0
    estimate) and adds the negative back; with a single prediction, to that prediction."""

    def __init__(self, operation):
        self.operation = operation

    def __call__(self, args: dict):
        conds_out = list(args["conds_out"])
        if len(conds_out) == 2:
            conds_out[0] = self.operation(latent=conds_out[0] - conds_out[1]) + conds_out[1]
        else:
            conds_out[0] = self.operation(latent=conds_out[0])
        return conds_out


class LatentApplyOperationCFG:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "operation": ("LATENT_OPERATION",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    def patch(self, model, operation):
        patched = model.clone()
        patched.set_model_sampler_pre_cfg_function(GuidanceOperation(operation))
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "LatentAdd": LatentAdd,
    "LatentSubtract": LatentSubtract,
    "LatentMultiply": LatentMultiply,
    "LatentInterpolate": LatentInterpolate,
    "LatentConcat": LatentConcat,
    "LatentCut": LatentCut,
    "LatentBatch": LatentBatch,
    "LatentBatchSeedBehavior": LatentBatchSeedBehavior,
    "RebatchLatents": RebatchLatents,
    "LatentCompositeMasked": LatentCompositeMasked,
    "LatentOperationSharpen": LatentOperationSharpen,
    "LatentOperationTonemapReinhard": LatentOperationTonemapReinhard,
    "LatentApplyOperation": LatentApplyOperation,
    "LatentApplyOperationCFG": LatentApplyOperationCFG,
}

# ComfyUI 0.3.64 reports null for its V3 latent nodes; LatentCompositeMasked shows its class name.
NODE_DISPLAY_NAME_MAPPINGS = {
    **{name: None for name in NODE_CLASS_MAPPINGS if name not in ("RebatchLatents", "LatentCompositeMasked")},
    "RebatchLatents": "Rebatch Latents",
}
