"""Image batch and post-processing nodes (ComfyUI's comfy_extras image nodes): picking and repeating frames,
YUV planes, blending, palette quantisation, noise, image size and scaling to a pixel count.

Transforms live in image_transform.py, morphology and Canny in image_filters.py, animated saving in
image_saving.py. Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

import math

from .images import UPSCALE_METHODS, upscale

BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]
DITHER_MODES = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


def _combo(options, **extra):
    """A combo input written the way ComfyUI's V3 nodes describe theirs."""
    return ("COMBO", {**extra, "multiselect": False, "options": list(options)})


def match_alpha(reference, other):
    """`other` with as many channels as `reference`: alpha dropped, or an opaque alpha added (ComfyUI's rule)."""
    import torch.nn.functional as F

    if reference.shape[-1] < other.shape[-1]:
        return other[..., :reference.shape[-1]]
    if reference.shape[-1] > other.shape[-1]:
        return F.pad(other, (0, 1), value=1.0)
    return other


class ImageFromBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
            "length": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "frombatch"
    CATEGORY = "image/batch"

    def frombatch(self, image, batch_index, length):
        # An index past the end picks the last frame, as ComfyUI does.
        start = min(image.shape[0] - 1, batch_index)
        count = min(image.shape[0] - start, length)
        return (image[start:start + count].clone(),)


class RepeatImageBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "amount": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"
    CATEGORY = "image/batch"

    def repeat(self, image, amount):
        return (image.repeat((amount, 1, 1, 1)),)


class ImageRGBToYUV:
    """Full-range BT.601 YCbCr, each plane returned as a grey image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {})}}

    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("Y", "U", "V")
    FUNCTION = "execute"
    CATEGORY = "image/batch"

    def execute(self, image):
        red, green, blue = image[..., 0:1], image[..., 1:2], image[..., 2:3]
        luma = 0.299 * red + 0.587 * green + 0.114 * blue
        planes = (luma, (blue - luma) * 0.564 + 0.5, (red - luma) * 0.713 + 0.5)
        return tuple(plane.expand_as(image) for plane in planes)


class ImageYUVToRGB:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"Y": ("IMAGE", {}), "U": ("IMAGE", {}), "V": ("IMAGE", {})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"
    CATEGORY = "image/batch"

    def execute(self, Y, U, V):
        import torch

        # Each plane may come as a grey RGB image: its channel mean is the plane.
        luma, cb, cr = (plane.mean(dim=-1, keepdim=True) for plane in (Y, U, V))
        cb, cr = cb - 0.5, cr - 0.5
        return (torch.cat((luma + 1.403 * cr, luma - 0.714 * cr - 0.344 * cb, luma + 1.773 * cb), dim=-1),)


def _blend(mode: str, base, layer):
    import torch

    if mode == "normal":
        return layer
    if mode == "multiply":
        return base * layer
    if mode == "screen":
        return 1 - (1 - base) * (1 - layer)
    if mode == "overlay":
        return torch.where(base <= 0.5, 2 * base * layer, 1 - 2 * (1 - base) * (1 - layer))
    if mode == "soft_light":
        # The W3C soft-light formula.
        lifted = torch.where(base <= 0.25, ((16 * base - 12) * base + 4) * base, torch.sqrt(base))
        return torch.where(layer <= 0.5, base - (1 - 2 * layer) * base * (1 - base),
                           base + (2 * layer - 1) * (lifted - base))
    if mode == "difference":
        return base - layer  # ComfyUI's "difference" is not absolute: negatives clamp to 0 afterwards
    raise ValueError(f"ImageBlend: unknown blend_mode {mode!r}; one of {BLEND_MODES}")


class ImageBlend:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image1": ("IMAGE", {}),
            "image2": ("IMAGE", {}),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            "blend_mode": _combo(BLEND_MODES),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blend_images"
    CATEGORY = "image/postprocessing"

    def blend_images(self, image1, image2, blend_factor, blend_mode):
        image2 = match_alpha(image1, image2).to(image1.device)
        if image1.shape != image2.shape:
            image2 = upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bicubic",
                             "center").movedim(1, -1)
        blended = _blend(blend_mode, image1, image2)
        return ((image1 * (1 - blend_factor) + blended * blend_factor).clamp(0, 1),)


def _normalised_bayer(level: int):
    """ComfyUI's recursive Bayer construction: B0 = [[0]], Bn = [[m-1.5, m+0.5], [m+1.5, m-0.5]] / 4^n with
    m = 4^n * B(n-1)."""
    import torch

    if level == 0:
        return torch.zeros((1, 1), dtype=torch.float64)
    scale = 4 ** level
    m = scale * _normalised_bayer(level - 1)
    return torch.cat((torch.cat((m - 1.5, m + 0.5), dim=1), torch.cat((m + 1.5, m - 0.5), dim=1)), dim=0) / scale


def _bayer_quantize(picture, palette, order: int):
    """Adds a tiled Bayer threshold (spread over the palette's spacing) to each channel, then maps each pixel to
    its nearest palette colour without error diffusion."""
    import numpy as np
    import torch
    from PIL import Image

    colours = len(palette.getpalette()) // 3
    threshold = (2 * 256 / colours) * _normalised_bayer(int(math.log2(order))) + 0.5
    pixels = torch.from_numpy(np.array(picture).astype(np.float32))
    height, width = pixels.shape[0], pixels.shape[1]
    tiled = threshold.tile(math.ceil(height / order), math.ceil(width / order))[:height, :width, None]
    pixels = (pixels + tiled).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy()).quantize(palette=palette, dither=Image.Dither.NONE)


class ImageQuantize:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {}),
            "colors": ("INT", {"default": 256, "min": 1, "max": 256, "step": 1}),
            "dither": _combo(DITHER_MODES),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "quantize"
    CATEGORY = "image/postprocessing"

    def quantize(self, image, colors, dither):
        import numpy as np
        import torch
        from PIL import Image

        if dither not in DITHER_MODES:
            raise ValueError(f"ImageQuantize: unknown dither {dither!r}; one of {DITHER_MODES}")
        frames = []
        for frame in image:
            pixels = (frame[..., :3].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
            picture = Image.fromarray(pixels, mode="RGB")
            palette = picture.quantize(colors=colors)  # median-cut palette of this frame
            if dither.startswith("bayer"):
                quantized = _bayer_quantize(picture, palette, int(dither.split("-")[1]))
            else:
                method = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
                quantized = picture.quantize(palette=palette, dither=method)
            frames.append(torch.from_numpy(np.array(quantized.convert("RGB"))).float() / 255)
        return (torch.stack(frames).to(image.device),)


class ImageAddNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"
    CATEGORY = "image"

    def repeat(self, image, seed, strength):
        import torch

        # Drawn on the CPU from a generator seeded like torch.manual_seed(seed), so results match ComfyUI's.
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(image.size(), generator=generator, device="cpu").to(image)
        return ((image + strength * noise).clamp(0.0, 1.0),)


class GetImageSize:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT", "INT", "INT")
    RETURN_NAMES = ("width", "height", "batch_size")
    FUNCTION = "get_size"
    CATEGORY = "image"
    DESCRIPTION = "Returns width and height of the image, and passes it through unchanged."

    def get_size(self, image, unique_id=None):
        return (image.shape[2], image.shape[1], image.shape[0])


class ImageScaleToTotalPixels:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {}),
            "upscale_method": _combo(UPSCALE_METHODS),
            "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, megapixels):
        if upscale_method not in UPSCALE_METHODS:
            raise ValueError(f"ImageScaleToTotalPixels: unknown upscale_method {upscale_method!r}")
        samples = image.movedim(-1, 1)
        # A megapixel is 1024 * 1024 pixels here, as in ComfyUI.
        scale = math.sqrt(int(megapixels * 1024 * 1024) / (samples.shape[2] * samples.shape[3]))
        width, height = round(samples.shape[3] * scale), round(samples.shape[2] * scale)
        return (upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1),)


NODE_CLASS_MAPPINGS = {
    "ImageFromBatch": ImageFromBatch,
    "RepeatImageBatch": RepeatImageBatch,
    "ImageRGBToYUV": ImageRGBToYUV,
    "ImageYUVToRGB": ImageYUVToRGB,
    "ImageBlend": ImageBlend,
    "ImageQuantize": ImageQuantize,
    "ImageAddNoise": ImageAddNoise,
    "GetImageSize": GetImageSize,
    "ImageScaleToTotalPixels": ImageScaleToTotalPixels,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageRGBToYUV": None,
    "ImageYUVToRGB": None,
    "ImageBlend": None,
    "ImageQuantize": None,
    "ImageScaleToTotalPixels": None,
    "GetImageSize": "Get Image Size",
}
