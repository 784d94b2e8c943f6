"""Morphology (erode, dilate and their compositions) and the Canny edge detector, in plain torch.

ComfyUI runs both through kornia; these follow the same definitions: a flat square structuring element whose
window for an even size k spans k//2 pixels before and k - 1 - k//2 after, pixels outside the image ignored;
Canny on the greyscale image with a 5x5 Gaussian (sigma 1), unnormalised 3x3 Sobel gradients, non-maximum
suppression along the gradient direction rounded to 45 degrees, two thresholds and hysteresis.
Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

import math

MORPHOLOGY_OPERATIONS = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"]
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _combo(options):
    return ("COMBO", {"multiselect": False, "options": list(options)})


# -- morphology -------------------------------------------------------------------------------------------

def dilate(planes, size: int):
    """Max over a size x size window of [B,C,H,W] planes; separable, so two 1-D max pools."""
    import torch.nn.functional as F

    before, after = size // 2, size - 1 - size // 2
    padded = F.pad(planes, (before, after, before, after), value=float("-inf"))
    rows = F.max_pool2d(padded, kernel_size=(size, 1), stride=1)
    return F.max_pool2d(rows, kernel_size=(1, size), stride=1)


def erode(planes, size: int):
    return -dilate(-planes, size)


def morphology(planes, operation: str, size: int):
    if operation == "erode":
        return erode(planes, size)
    if operation == "dilate":
        return dilate(planes, size)
    if operation == "open":
        return dilate(erode(planes, size), size)
    if operation == "close":
        return erode(dilate(planes, size), size)
    if operation == "gradient":
        return dilate(planes, size) - erode(planes, size)
    if operation == "top_hat":
        return planes - dilate(erode(planes, size), size)
    if operation == "bottom_hat":
        return erode(dilate(planes, size), size) - planes
    raise ValueError(f"Morphology: unknown operation {operation!r}; one of {MORPHOLOGY_OPERATIONS}")


class Morphology:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {}),
            "operation": _combo(MORPHOLOGY_OPERATIONS),
            "kernel_size": ("INT", {"default": 3, "min": 3, "max": 999, "step": 1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "process"
    CATEGORY = "image/postprocessing"

    def process(self, image, operation, kernel_size):
        if kernel_size < 1:
            raise ValueError(f"Morphology: kernel_size must be at least 1, got {kernel_size}")
        return (morphology(image.movedim(-1, 1), operation, kernel_size).movedim(1, -1),)


# -- Canny ------------------------------------------------------------------------------------------------

def gaussian_blur(planes, size: int = 5, sigma: float = 1.0):
    """Separable Gaussian blur of [B,1,H,W] with reflected borders."""
    import torch
    import torch.nn.functional as F

    offsets = torch.arange(size, dtype=planes.dtype, device=planes.device) - size // 2
    weights = torch.exp(-(offsets ** 2) / (2 * sigma * sigma))
    weights = weights / weights.sum()
    radius = size // 2
    padded = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, weights.view(1, 1, size, 1))
    return F.conv2d(blurred, weights.view(1, 1, 1, size))


def sobel(planes):
    """Unnormalised Sobel derivatives (d/dx, d/dy) of [B,1,H,W], borders replicated; y grows downwards."""
    import torch
    import torch.nn.functional as F

    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=planes.dtype, device=planes.device)
    slope = torch.tensor([-1.0, 0.0, 1.0], dtype=planes.dtype, device=planes.device)
    padded = F.pad(planes, (1, 1, 1, 1), mode="replicate")
    d_dx = F.conv2d(padded, (smooth[:, None] * slope[None, :]).view(1, 1, 3, 3))
    d_dy = F.conv2d(padded, (slope[:, None] * smooth[None, :]).view(1, 1, 3, 3))
    return d_dx, d_dy


# Neighbour offsets (dy, dx) for gradient directions 0, 45, ..., 315 degrees (y down, so 90 points down).
_DIRECTIONS = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]


def non_maximum_suppression(magnitude, d_dx, d_dy):
    """Keeps a pixel only where its magnitude is strictly larger than both neighbours along the gradient."""
    import torch
    import torch.nn.functional as F

    angle = torch.round(torch.rad2deg(torch.atan2(d_dy, d_dx)) / 45) * 45
    forward = ((angle / 45) % 8).long()
    backward = ((angle / 45 + 4) % 8).long()
    height, width = magnitude.shape[-2], magnitude.shape[-1]
    padded = F.pad(magnitude, (1, 1, 1, 1))  # outside the image counts as zero magnitude
    # Centre minus each neighbour, one plane per direction: [B,8,H,W].
    margins = torch.cat([magnitude - padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                         for dy, dx in _DIRECTIONS], dim=1)
    ahead = torch.gather(margins, 1, forward)
    behind = torch.gather(margins, 1, backward)
    return magnitude * (torch.minimum(ahead, behind) > 0)


def hysteresis(strong, weak):
    """Grows the strong edge pixels through 8-connected weak ones until nothing changes."""
    import torch.nn.functional as F

    edges = strong.float()
    candidates = (strong | weak).float()
    while True:
        grown = F.max_pool2d(edges, kernel_size=3, stride=1, padding=1) * candidates
        if (grown == edges).all():
            return edges
        edges = grown


def canny(image, low_threshold: float, high_threshold: float):
    """Edges of an IMAGE [B,H,W,C] as a [B,1,H,W] tensor of 0s and 1s."""
    import torch

    planes = image.movedim(-1, 1)
    if planes.shape[1] >= 3:
        weights = torch.tensor(GREY_WEIGHTS, dtype=planes.dtype, device=planes.device).view(1, 3, 1, 1)
        planes = (planes[:, :3] * weights).sum(dim=1, keepdim=True)
    else:
        planes = planes[:, :1]
    d_dx, d_dy = sobel(gaussian_blur(planes))
    magnitude = torch.sqrt(d_dx * d_dx + d_dy * d_dy + 1e-6)
    thin = non_maximum_suppression(magnitude, d_dx, d_dy)
    strong = thin > high_threshold
    weak = (thin > low_threshold) & ~strong
    return hysteresis(strong, weak)


class Canny:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {}),
            "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
            "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "detect_edge"
    CATEGORY = "image/preprocessors"

    def detect_edge(self, image, low_threshold, high_threshold):
        if not (math.isfinite(low_threshold) and math.isfinite(high_threshold)) or low_threshold > high_threshold:
            raise ValueError(f"Canny: low_threshold ({low_threshold}) must not exceed high_threshold "
                             f"({high_threshold})")
        edges = canny(image.float(), low_threshold, high_threshold)
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1).to(image.dtype),)


NODE_CLASS_MAPPINGS = {"Morphology": Morphology, "Canny": Canny}
NODE_DISPLAY_NAME_MAPPINGS = {"Morphology": "ImageMorphology", "Canny": None}
