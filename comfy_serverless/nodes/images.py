"""Image nodes: scaling, cropping, batching, padding, blur, sharpen and masked compositing.

Standard library only at module level (torch, numpy and PIL are imported where they are used): the server
imports packs to validate prompts before torch is loaded.

IMAGE is a float32 tensor [batch, height, width, channels] in 0..1; MASK is [batch, height, width].
"""

from __future__ import annotations

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def upscale(samples, width: int, height: int, method: str, crop: str):
    """Resizes [B,C,H,W] samples to width x height. crop='center' first trims them to the target aspect."""
    import torch

    if crop == "center":
        old_h, old_w = samples.shape[-2], samples.shape[-1]
        old_aspect, new_aspect = old_w / old_h, width / height
        trim_x = trim_y = 0
        if old_aspect > new_aspect:
            trim_x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            trim_y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples[..., trim_y:old_h - trim_y, trim_x:old_w - trim_x]
    if method == "lanczos":
        return _lanczos(samples, width, height)
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)


def _lanczos(samples, width: int, height: int):
    """PIL's Lanczos, one image at a time and through 8 bits, as ComfyUI does (so results match it)."""
    import numpy as np
    import torch
    from PIL import Image

    resized = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).cpu().float().numpy(), 0, 255).astype(np.uint8)
        single = pixels.shape[-1] == 1  # PIL has no H x W x 1 mode: go through "L"
        pil = Image.fromarray(pixels[..., 0] if single else pixels)
        out = np.asarray(pil.resize((width, height), resample=Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        resized.append(torch.from_numpy(out[..., None] if single else out).movedim(-1, 0))
    return torch.stack(resized).to(samples.device, samples.dtype)


def _gaussian_kernel(size: int, sigma: float):
    """A size x size Gaussian over coordinates spanning -1..1 (ComfyUI's convention), summing to 1."""
    import torch

    axis = torch.linspace(-1, 1, size)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    weights = torch.exp(-(xs * xs + ys * ys) / (2.0 * sigma * sigma))
    return weights / weights.sum()


def _filter(image, kernel, radius: int):
    """Convolves every channel of an IMAGE with a square kernel, reflecting the borders."""
    import torch.nn.functional as F

    channels = image.shape[-1]
    weight = kernel.to(image.dtype).repeat(channels, 1, 1).unsqueeze(1)
    planes = F.pad(image.permute(0, 3, 1, 2), (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(planes, weight, groups=channels).permute(0, 2, 3, 1)


def _repeat_to_batch(tensor, batch: int):
    """Cuts or cycles the first dimension to `batch` entries."""
    count = tensor.shape[0]
    if count > batch:
        return tensor[:batch]
    if count < batch:
        repeats = -(-batch // count)
        return tensor.repeat(repeats, *([1] * (tensor.ndim - 1)))[:batch]
    return tensor


class ImageScale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (CROP_METHODS,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        samples = image.movedim(-1, 1)
        old_h, old_w = samples.shape[2], samples.shape[3]
        # A zero side follows the other one, keeping the aspect ratio.
        if width == 0:
            width = max(1, round(old_w * height / old_h))
        elif height == 0:
            height = max(1, round(old_h * width / old_w))
        return (upscale(samples, width, height, upscale_method, crop).movedim(1, -1),)


class ImageScaleBy:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, scale_by):
        samples = image.movedim(-1, 1)
        width = round(samples.shape[3] * scale_by)
        height = round(samples.shape[2] * scale_by)
        return (upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1),)


class ImageInvert:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image"

    def invert(self, image):
        return (1.0 - image,)


class ImageBatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"
    CATEGORY = "image"

    def batch(self, image1, image2):
        import torch
        import torch.nn.functional as F

        if image1.shape[-1] != image2.shape[-1]:
            # RGB batched with RGBA: the RGB side gets an opaque alpha channel.
            if image1.shape[-1] > image2.shape[-1]:
                image2 = F.pad(image2, (0, 1), value=1.0)
            else:
                image1 = F.pad(image1, (0, 1), value=1.0)
        if image1.shape[1:] != image2.shape[1:]:
            image2 = upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear",
                             "center").movedim(1, -1)
        return (torch.cat((image1, image2), dim=0),)


class EmptyImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    def generate(self, width, height, batch_size=1, color=0):
        import torch

        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        pixel = torch.tensor(rgb, dtype=torch.float32)
        return (pixel.expand(batch_size, height, width, 3).contiguous(),)


class ImagePadForOutpaint:
    @classmethod
    def INPUT_TYPES(cls):
        side = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {
            "image": ("IMAGE",),
            "left": ("INT", dict(side)),
            "top": ("INT", dict(side)),
            "right": ("INT", dict(side)),
            "bottom": ("INT", dict(side)),
            "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"
    CATEGORY = "image"

    def expand_image(self, image, left, top, right, bottom, feathering):
        import torch

        batch, height, width, channels = image.shape
        canvas = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5,
                            dtype=torch.float32)
        canvas[:, top:top + height, left:left + width, :] = image

        mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
        inside = torch.zeros((height, width), dtype=torch.float32)
        if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
            rows = torch.arange(height, dtype=torch.float64)[:, None]
            cols = torch.arange(width, dtype=torch.float64)[None, :]
            # Distance to each padded edge; an edge that was not padded is treated as far away.
            far_rows, far_cols = torch.full_like(rows, height), torch.full_like(cols, width)
            distance = torch.minimum(
                torch.minimum(rows if top else far_rows, height - rows if bottom else far_rows),
                torch.minimum(cols if left else far_cols, width - cols if right else far_cols))
            ramp = ((feathering - distance) / feathering).clamp(min=0)
            inside = (ramp * ramp).to(torch.float32)
        mask[top:top + height, left:left + width] = inside
        return (canvas, mask.unsqueeze(0))


class ImageCrop:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "crop"
    CATEGORY = "image/transform"

    def crop(self, image, width, height, x, y):
        # The origin is kept inside the image, so the result is never empty.
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class ImageBlur:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blur"
    CATEGORY = "image/postprocessing"

    def blur(self, image, blur_radius, sigma):
        if blur_radius == 0:
            return (image,)
        kernel = _gaussian_kernel(blur_radius * 2 + 1, sigma)
        return (_filter(image, kernel, blur_radius),)


class ImageSharpen:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sharpen"
    CATEGORY = "image/postprocessing"

    def sharpen(self, image, sharpen_radius, sigma, alpha):
        import torch

        if sharpen_radius == 0:
            return (image,)
        # Unsharp mask in one kernel: a negative Gaussian whose centre tap makes the weights sum to 1.
        kernel = _gaussian_kernel(sharpen_radius * 2 + 1, sigma) * -(alpha * 10)
        kernel[sharpen_radius, sharpen_radius] = kernel[sharpen_radius, sharpen_radius] - kernel.sum() + 1.0
        return (torch.clamp(_filter(image, kernel, sharpen_radius), 0, 1),)


class ImageCompositeMasked:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "destination": ("IMAGE",),
                "source": ("IMAGE",),
                "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                "resize_source": ("BOOLEAN", {"default": False}),
            },
            "optional": {"mask": ("MASK",)},
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "composite"
    CATEGORY = "image"

    def composite(self, destination, source, x, y, resize_source, mask=None):
        import torch
        import torch.nn.functional as F

        if destination.shape[-1] < source.shape[-1]:
            source = source[..., :destination.shape[-1]]
        elif destination.shape[-1] > source.shape[-1]:
            source = F.pad(source, (0, 1), value=1.0)  # an RGB source pasted on RGBA is opaque

        canvas = destination.clone().movedim(-1, 1)
        source = source.to(canvas.device).movedim(-1, 1)
        if resize_source:
            source = F.interpolate(source, size=canvas.shape[2:], mode="bilinear")
        source = _repeat_to_batch(source, canvas.shape[0])

        left = max(0, min(x, canvas.shape[3]))
        top = max(0, min(y, canvas.shape[2]))
        visible_h = min(source.shape[2], canvas.shape[2] - top)
        visible_w = min(source.shape[3], canvas.shape[3] - left)

        if mask is None:
            weight = torch.ones_like(source)
        else:
            weight = mask.to(canvas.device, copy=True).reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
            weight = F.interpolate(weight, size=source.shape[2:], mode="bilinear")
            weight = _repeat_to_batch(weight, source.shape[0])
        weight = weight[:, :, :visible_h, :visible_w]

        region = canvas[:, :, top:top + visible_h, left:left + visible_w]
        pasted = source[:, :, :visible_h, :visible_w]
        canvas[:, :, top:top + visible_h, left:left + visible_w] = weight * pasted + (1.0 - weight) * region
        return (canvas.movedim(1, -1),)


class RebatchImages:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("IMAGE",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "rebatch"
    CATEGORY = "image/batch"

    def rebatch(self, images, batch_size):
        import torch

        size = batch_size[0]  # every input arrives as a list
        frames = [batch[i:i + 1] for batch in images for i in range(batch.shape[0])]
        return ([torch.cat(frames[start:start + size], dim=0) for start in range(0, len(frames), size)],)


NODE_CLASS_MAPPINGS = {
    "ImageScale": ImageScale,
    "ImageScaleBy": ImageScaleBy,
    "ImageInvert": ImageInvert,
    "ImageBatch": ImageBatch,
    "EmptyImage": EmptyImage,
    "ImagePadForOutpaint": ImagePadForOutpaint,
    "ImageCrop": ImageCrop,
    "ImageBlur": ImageBlur,
    "ImageSharpen": ImageSharpen,
    "ImageCompositeMasked": ImageCompositeMasked,
    "RebatchImages": RebatchImages,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageScale": "Upscale Image",
    "ImageScaleBy": "Upscale Image By",
    "ImageInvert": "Invert Image",
    "ImageBatch": "Batch Images",
    "ImagePadForOutpaint": "Pad Image for Outpainting",
    "ImageCrop": "Image Crop",
    "ImageBlur": None,
    "ImageSharpen": None,
    "RebatchImages": "Rebatch Images",
}
