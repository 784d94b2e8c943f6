"""Latent nodes: empty latents, resizing, batches, compositing, transforms, noise masks, .latent files.

LATENT is {"samples": [B, 4, H/8, W/8] raw VAE latent, "noise_mask"?: [B or 1, 1, h, w],
"batch_index"?: [int...]}. Nodes copy the dict and keep the keys they do not touch, as ComfyUI does.
Standard library only at module level (torch is imported where it is used).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from .. import paths, settings
from .images import upscale

MAX_RESOLUTION = 16384
LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]
# LoadLatent: files saved before ComfyUI stored raw latents hold them times SD's scale factor.
LEGACY_LATENT_SCALE = 0.18215


def upscale_latent(samples, width: int, height: int, method: str, crop: str):
    """Resize [B, C, h, w] latents to width x height cells (see images.upscale; plus 'bislerp')."""
    if method != "bislerp":
        return upscale(samples, width, height, method, crop)
    if crop == "center":
        samples = _center_crop(samples, width, height)
    return _slerp_resize(_slerp_resize(samples, width, dim=3), height, dim=2)


def _center_crop(samples, width: int, height: int):
    """Trim the sides so the aspect ratio is width:height (as images.upscale does before resizing)."""
    old_h, old_w = samples.shape[-2], samples.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    trim_x = trim_y = 0
    if old_aspect > new_aspect:
        trim_x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        trim_y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples[..., trim_y:old_h - trim_y, trim_x:old_w - trim_x]


def _slerp_resize(samples, size: int, dim: int):
    """Resize one spatial axis the way bilinear sampling picks neighbours and weights (half-pixel centres),
    but blend the two neighbouring channel vectors by spherical interpolation: direction by slerp, length
    linearly. Keeps latent vectors' norms, which plain bilinear shrinks between dissimilar cells."""
    import torch

    length = samples.shape[dim]
    if length == size:
        return samples
    position = ((torch.arange(size, dtype=torch.float64) + 0.5) * (length / size) - 0.5).clamp(min=0)
    low = position.floor().long().clamp(max=length - 1)
    high = (low + 1).clamp(max=length - 1)
    ratio = (position - low).float()
    moved = samples.movedim(dim, -1).movedim(1, -1)  # [..., positions, C]
    a, b = moved[..., low, :].float(), moved[..., high, :].float()
    ratio = ratio.reshape(-1, 1)
    a_norm, b_norm = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    a_unit, b_unit = a / a_norm.clamp(min=1e-12), b / b_norm.clamp(min=1e-12)
    cosine = (a_unit * b_unit).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    direction = (torch.sin((1.0 - ratio) * omega) * a_unit + torch.sin(ratio * omega) * b_unit) / sin_omega
    blended = direction * (a_norm * (1.0 - ratio) + b_norm * ratio)
    # Nearly parallel vectors: the neighbour itself; nearly opposite: plain linear interpolation.
    blended = torch.where(cosine > 1 - 1e-5, a, blended)
    blended = torch.where(cosine < 1e-5 - 1, a * (1.0 - ratio) + b * ratio, blended)
    return blended.to(samples.dtype).movedim(-1, 1).movedim(-1, dim)


def _repeat_masks(masks, count: int):
    if masks.shape[0] < count:
        masks = masks.repeat(math.ceil(count / masks.shape[0]), 1, 1, 1)[:count]
    return masks


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Image width in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Image height in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "How many latents."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("A batch of empty latents.",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Creates a batch of empty latents for the sampler to fill."

    def generate(self, width, height, batch_size=1):
        import torch

        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class LatentUpscale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (LATENT_UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "crop": (CROP_METHODS,),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"

    def upscale(self, samples, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (samples,)
        latent = samples["samples"]
        # A zero side follows the aspect ratio; sides are at least 64 pixels (ComfyUI's rule).
        if width == 0:
            height = max(64, height)
            width = max(64, round(latent.shape[3] * height / latent.shape[2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(latent.shape[2] * width / latent.shape[3]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(samples)
        out["samples"] = upscale_latent(latent, width // 8, height // 8, upscale_method, crop)
        return (out,)


class LatentUpscaleBy:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (LATENT_UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"

    def upscale(self, samples, upscale_method, scale_by):
        latent = samples["samples"]
        width, height = round(latent.shape[3] * scale_by), round(latent.shape[2] * scale_by)
        out = dict(samples)
        out["samples"] = upscale_latent(latent, width, height, upscale_method, "disabled")
        return (out,)


class LatentFromBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 63}),
            "length": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "frombatch"
    CATEGORY = "latent/batch"

    def frombatch(self, samples, batch_index, length):
        latent = samples["samples"]
        start = min(latent.shape[0] - 1, batch_index)
        length = min(latent.shape[0] - start, length)
        out = dict(samples)
        out["samples"] = latent[start:start + length].clone()
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                out["noise_mask"] = _repeat_masks(masks, latent.shape[0])[start:start + length].clone()
        # batch_index keeps the items' noise identical to what they would get in the full batch.
        if "batch_index" in samples:
            out["batch_index"] = samples["batch_index"][start:start + length]
        else:
            out["batch_index"] = list(range(start, start + length))
        return (out,)


class RepeatLatentBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "amount": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "repeat"
    CATEGORY = "latent/batch"

    def repeat(self, samples, amount):
        latent = samples["samples"]
        out = dict(samples)
        out["samples"] = latent.repeat((amount, 1, 1, 1))
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            masks = _repeat_masks(samples["noise_mask"], latent.shape[0])
            out["noise_mask"] = masks.repeat((amount, 1, 1, 1))
        if "batch_index" in samples:
            indices = samples["batch_index"]
            offset = max(indices) - min(indices) + 1
            out["batch_index"] = indices + [i + copy * offset for copy in range(1, amount) for i in indices]
        return (out,)


class LatentComposite:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples_to": ("LATENT",),
            "samples_from": ("LATENT",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "feather": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"
    CATEGORY = "latent"

    def composite(self, samples_to, samples_from, x, y, feather=0):
        import torch

        x, y, feather = x // 8, y // 8, feather // 8
        target = samples_to["samples"]
        result = target.clone()
        source = samples_from["samples"][:, :, :max(0, target.shape[2] - y), :max(0, target.shape[3] - x)]
        height, width = source.shape[2], source.shape[3]
        region = result[:, :, y:y + height, x:x + width]
        if feather == 0:
            region[...] = source
        else:
            # Linear fade over `feather` cells on the edges that lie inside the target.
            mask = torch.ones_like(source)
            for t in range(feather):
                fade = (t + 1) / feather
                if y != 0:
                    mask[:, :, t, :] *= fade
                if y + height < target.shape[2]:
                    mask[:, :, height - 1 - t, :] *= fade
                if x != 0:
                    mask[:, :, :, t] *= fade
                if x + width < target.shape[3]:
                    mask[:, :, :, width - 1 - t] *= fade
            region[...] = source * mask + region * (1.0 - mask)
        out = dict(samples_to)
        out["samples"] = result
        return (out,)


class LatentBlend:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples1": ("LATENT",),
            "samples2": ("LATENT",),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "blend"
    CATEGORY = "_for_testing"

    def blend(self, samples1, samples2, blend_factor):
        first, second = samples1["samples"], samples2["samples"]
        if first.shape != second.shape:
            second = upscale(second, first.shape[3], first.shape[2], "bicubic", "center")
        out = dict(samples1)
        out["samples"] = first * blend_factor + second * (1.0 - blend_factor)
        return (out,)


class LatentRotate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "rotation": (["none", "90 degrees", "180 degrees", "270 degrees"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "rotate"
    CATEGORY = "latent/transform"

    def rotate(self, samples, rotation):
        import torch

        turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[rotation]
        out = dict(samples)
        out["samples"] = torch.rot90(samples["samples"], k=turns, dims=[3, 2])  # clockwise
        return (out,)


class LatentFlip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "flip_method": (["x-axis: vertically", "y-axis: horizontally"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "flip"
    CATEGORY = "latent/transform"

    def flip(self, samples, flip_method):
        import torch

        out = dict(samples)
        out["samples"] = torch.flip(samples["samples"], dims=[2 if flip_method.startswith("x") else 3])
        return (out,)


class LatentCrop:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "width": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "crop"
    CATEGORY = "latent/transform"

    def crop(self, samples, width, height, x, y):
        latent = samples["samples"]
        # The crop starts at most 8 cells (64 pixels) before the far edges.
        x, y = min(x // 8, latent.shape[3] - 8), min(y // 8, latent.shape[2] - 8)
        x, y = max(0, x), max(0, y)
        out = dict(samples)
        out["samples"] = latent[:, :, y:y + height // 8, x:x + width // 8]
        return (out,)


class SetLatentNoiseMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"

    def set_mask(self, samples, mask):
        out = dict(samples)
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


class SaveLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"samples": ("LATENT",), "filename_prefix": ("STRING", {"default": "latents/ComfyUI"})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def save(self, samples, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        import torch
        from safetensors.torch import save_file

        from .image_files import save_image_path

        folder, base, counter, subfolder = save_image_path(filename_prefix, paths.current().output)
        metadata = None
        if not settings.current().disable_metadata:
            metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
            for key, value in (extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        name = f"{base}_{counter:05}_.latent"
        tensors = {"latent_tensor": samples["samples"].contiguous(), "latent_format_version_0": torch.tensor([])}
        with paths.atomic_path(os.path.join(folder, name)) as partial:
            save_file(tensors, partial, metadata=metadata)
        return {"ui": {"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


def _latent_files() -> list[str]:
    folder = paths.current().input
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(".latent"))
    except FileNotFoundError:
        return []


class LoadLatent:
    @classmethod
    def INPUT_TYPES(cls):
        # A plain list: the catalogue keeps it as of its snapshot; VALIDATE_INPUTS checks the real file.
        return {"required": {"latent": (_latent_files(),)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, latent):
        from safetensors.torch import load_file

        tensors = load_file(paths.current().resolve_annotated(latent), device="cpu")
        scale = 1.0 if "latent_format_version_0" in tensors else 1.0 / LEGACY_LATENT_SCALE
        return ({"samples": tensors["latent_tensor"].float() * scale},)

    @classmethod
    def IS_CHANGED(cls, latent):
        digest = hashlib.sha256()
        with open(paths.current().resolve_annotated(latent), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, latent):
        if not paths.current().annotated_exists(latent):
            return f"Invalid latent file: {latent}"
        return True


NODE_CLASS_MAPPINGS = {
    "EmptyLatentImage": EmptyLatentImage,
    "LatentUpscale": LatentUpscale,
    "LatentUpscaleBy": LatentUpscaleBy,
    "LatentFromBatch": LatentFromBatch,
    "RepeatLatentBatch": RepeatLatentBatch,
    "LatentComposite": LatentComposite,
    "LatentBlend": LatentBlend,
    "LatentRotate": LatentRotate,
    "LatentFlip": LatentFlip,
    "LatentCrop": LatentCrop,
    "SetLatentNoiseMask": SetLatentNoiseMask,
    "SaveLatent": SaveLatent,
    "LoadLatent": LoadLatent,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EmptyLatentImage": "Empty Latent Image",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
    "LatentFromBatch": "Latent From Batch",
    "RepeatLatentBatch": "Repeat Latent Batch",
    "LatentComposite": "Latent Composite",
    "LatentBlend": "Latent Blend",
    "LatentRotate": "Rotate Latent",
    "LatentFlip": "Flip Latent",
    "LatentCrop": "Crop Latent",
    "SetLatentNoiseMask": "Set Latent Noise Mask",
}
