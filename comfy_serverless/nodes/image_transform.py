"""Image transforms from ComfyUI's comfy_extras.nodes_images: flip, rotate by quarter turns, stitch two images,
resize-and-pad to a box, and scale so the longer side has a given size.

Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

from .images import MAX_RESOLUTION, upscale

STITCH_COLOURS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                  "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ImageFlip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "flip_method": (["x-axis: vertically", "y-axis: horizontally"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "flip"
    CATEGORY = "image/transform"

    def flip(self, image, flip_method):
        if flip_method.startswith("x"):
            return (image.flip(1),)  # upside down
        if flip_method.startswith("y"):
            return (image.flip(2),)  # mirrored left to right
        raise ValueError(f"ImageFlip: unknown flip_method {flip_method!r}")


class ImageRotate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "rotation": (["none", "90 degrees", "180 degrees", "270 degrees"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "rotate"
    CATEGORY = "image/transform"

    def rotate(self, image, rotation):
        import torch

        quarter_turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}
        if rotation not in quarter_turns:
            raise ValueError(f"ImageRotate: unknown rotation {rotation!r}")
        # Clockwise as seen on screen: from the width axis towards the height axis.
        return (torch.rot90(image, k=quarter_turns[rotation], dims=(2, 1)),)


def _extend_batch(image, batch: int):
    """Repeats the last frame until the batch has `batch` frames."""
    import torch

    if image.shape[0] >= batch:
        return image
    return torch.cat((image, image[-1:].repeat(batch - image.shape[0], 1, 1, 1)))


def _pad_centred(image, axis: int, size: int, value: float):
    """Pads height (axis 1) or width (axis 2) to `size`, the extra split evenly (the odd pixel after)."""
    import torch.nn.functional as F

    missing = size - image.shape[axis]
    if missing <= 0:
        return image
    before, after = missing // 2, missing - missing // 2
    padding = (0, 0, before, after) if axis == 2 else (0, 0, 0, 0, before, after)
    return F.pad(image, padding, mode="constant", value=value)


def _add_alpha(image, channels: int):
    import torch

    if image.shape[-1] >= channels:
        return image
    opaque = torch.ones((*image.shape[:-1], channels - image.shape[-1]), dtype=image.dtype, device=image.device)
    return torch.cat((image, opaque), dim=-1)


class ImageStitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image1": ("IMAGE",),
                "direction": (["right", "down", "left", "up"], {"default": "right"}),
                "match_image_size": ("BOOLEAN", {"default": True}),
                "spacing_width": ("INT", {"default": 0, "min": 0, "max": 1024, "step": 2}),
                "spacing_color": (list(STITCH_COLOURS), {"default": "white"}),
            },
            "optional": {"image2": ("IMAGE",)},
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "stitch"
    CATEGORY = "image/transform"
    DESCRIPTION = ("Stitches image2 to image1 in the specified direction.\nIf image2 is not provided, returns image1 "
                   "unchanged.\nOptional spacing can be added between images.")

    def stitch(self, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        import torch

        if image2 is None:
            return (image1,)
        if direction not in ("right", "down", "left", "up") or spacing_color not in STITCH_COLOURS:
            raise ValueError(f"ImageStitch: unknown direction {direction!r} or spacing_color {spacing_color!r}")
        sideways = direction in ("left", "right")
        image2 = image2.to(image1.device)
        batch = max(image1.shape[0], image2.shape[0])
        image1, image2 = _extend_batch(image1, batch), _extend_batch(image2, batch)
        colour = STITCH_COLOURS[spacing_color]
        if match_image_size:
            # image2 keeps its aspect ratio and takes image1's height (side by side) or width (stacked).
            aspect = image2.shape[2] / image2.shape[1]
            if sideways:
                height, width = image1.shape[1], int(image1.shape[1] * aspect)
            else:
                width, height = image1.shape[2], int(image1.shape[2] / aspect)
            image2 = upscale(image2.movedim(-1, 1), width, height, "lanczos", "disabled").movedim(1, -1)
        else:
            # Grey colours pad with their value; a coloured spacing pads the images with black, as ComfyUI.
            pad = colour[0] if len(set(colour)) == 1 else 0.0
            axis = 1 if sideways else 2
            size = max(image1.shape[axis], image2.shape[axis])
            image1, image2 = _pad_centred(image1, axis, size, pad), _pad_centred(image2, axis, size, pad)
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = _add_alpha(image1, channels), _add_alpha(image2, channels)
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            spacing_width += spacing_width % 2
            if sideways:
                shape = (batch, max(image1.shape[1], image2.shape[1]), spacing_width, channels)
            else:
                shape = (batch, spacing_width, max(image1.shape[2], image2.shape[2]), channels)
            spacer = torch.zeros(shape, dtype=image1.dtype, device=image1.device)
            for index, value in enumerate(colour[:channels]):
                spacer[..., index] = value
            if channels == 4:
                spacer[..., 3] = 1.0
            parts.insert(1, spacer)
        return (torch.cat(parts, dim=2 if sideways else 1),)


class ResizeAndPadImage:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {
            "image": ("IMAGE",),
            "target_width": ("INT", dict(size)),
            "target_height": ("INT", dict(size)),
            "padding_color": (["white", "black"],),
            "interpolation": (["area", "bicubic", "nearest-exact", "bilinear", "lanczos"],),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "resize_and_pad"
    CATEGORY = "image/transform"

    def resize_and_pad(self, image, target_width, target_height, padding_color, interpolation):
        import torch

        batch, height, width, channels = image.shape
        scale = min(target_width / width, target_height / height)
        new_width, new_height = max(1, int(width * scale)), max(1, int(height * scale))
        resized = upscale(image.movedim(-1, 1), new_width, new_height, interpolation, "disabled")
        canvas = torch.full((batch, channels, target_height, target_width), 0.0 if padding_color == "black" else 1.0,
                            dtype=image.dtype, device=image.device)
        top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
        canvas[:, :, top:top + new_height, left:left + new_width] = resized
        return (canvas.movedim(1, -1),)


class ImageScaleToMaxDimension:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"],),
            "largest_size": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, largest_size):
        height, width = image.shape[1], image.shape[2]
        if height > width:
            width, height = round(width / height * largest_size), largest_size
        elif width > height:
            width, height = largest_size, round(height / width * largest_size)
        else:
            width = height = largest_size
        if width < 1 or height < 1:
            raise ValueError(f"ImageScaleToMaxDimension: largest_size {largest_size} gives an empty "
                             f"{width}x{height} image")
        return (upscale(image.movedim(-1, 1), width, height, upscale_method, "disabled").movedim(1, -1),)


NODE_CLASS_MAPPINGS = {
    "ImageFlip": ImageFlip,
    "ImageRotate": ImageRotate,
    "ImageStitch": ImageStitch,
    "ResizeAndPadImage": ResizeAndPadImage,
    "ImageScaleToMaxDimension": ImageScaleToMaxDimension,
}

NODE_DISPLAY_NAME_MAPPINGS = {"ImageStitch": "Image Stitch"}
