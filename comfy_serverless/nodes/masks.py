"""Mask nodes: solid masks, inversion, and conversion between MASK and IMAGE.

Standard library only at module level (torch is imported where it is used): the server imports packs to
validate prompts before torch is loaded.

MASK is a float32 tensor [batch, height, width] (a bare [height, width] mask is accepted); IMAGE is
[batch, height, width, channels].
"""

from __future__ import annotations

MAX_RESOLUTION = 16384
IMAGE_CHANNELS = ["red", "green", "blue", "alpha"]


class SolidMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "solid"
    CATEGORY = "mask"

    def solid(self, value, width, height):
        import torch

        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"
    CATEGORY = "mask"

    def invert(self, mask):
        return (1.0 - mask,)


class MaskToImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"
    CATEGORY = "mask"

    def mask_to_image(self, mask):
        grey = mask.reshape((-1, mask.shape[-2], mask.shape[-1], 1))
        return (grey.expand(-1, -1, -1, 3),)


class ImageToMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channel": (IMAGE_CHANNELS,)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    def image_to_mask(self, image, channel):
        index = IMAGE_CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: the image has no {channel} channel "
                             f"({image.shape[-1]} channels)")
        return (image[:, :, :, index],)


NODE_CLASS_MAPPINGS = {
    "SolidMask": SolidMask,
    "InvertMask": InvertMask,
    "MaskToImage": MaskToImage,
    "ImageToMask": ImageToMask,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MaskToImage": "Convert Mask to Image",
    "ImageToMask": "Convert Image to Mask",
}
