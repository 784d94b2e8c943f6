"""Mask nodes beyond the basics (grow, feather, threshold, composite, crop, colour to mask, preview) and alpha
compositing (Porter-Duff, splitting and joining an alpha channel).

Standard library only at module level (see nodes/__init__.py). MASK is [batch, height, width] (a bare
[height, width] mask is accepted); in ComfyUI's alpha nodes a mask is 1 - alpha (1 = transparent).
"""

from __future__ import annotations

from .image_files import PreviewImage
from .images import _repeat_to_batch, upscale

MAX_RESOLUTION = 16384
MASK_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]
PORTER_DUFF_MODES = ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN",
                     "MULTIPLY", "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"]


def _batched(mask):
    """Any mask as [batch, height, width]."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def _combo(options, **extra):
    """A combo input written the way ComfyUI's V3 nodes describe theirs."""
    return ("COMBO", {**extra, "multiselect": False, "options": list(options)})


def _position():
    return ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1})


class CropMask:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"mask": ("MASK",), "x": _position(), "y": _position(),
                             "width": ("INT", dict(size)), "height": ("INT", dict(size))}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "crop"
    CATEGORY = "mask"

    def crop(self, mask, x, y, width, height):
        mask = _batched(mask)
        if x >= mask.shape[2] or y >= mask.shape[1]:
            raise ValueError(f"CropMask: the corner ({x}, {y}) lies outside the {mask.shape[2]}x{mask.shape[1]} mask")
        return (mask[:, y:y + height, x:x + width],)


class FeatherMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "left": _position(), "top": _position(), "right": _position(),
                             "bottom": _position()}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "feather"
    CATEGORY = "mask"

    def feather(self, mask, left, top, right, bottom):
        import torch

        out = _batched(mask).clone()
        height, width = out.shape[1], out.shape[2]
        # The n-th row/column from an edge (0-based) is scaled by (n + 1) / feather width.
        for size, length, along_rows, from_end in ((left, width, False, False), (right, width, False, True),
                                                   (top, height, True, False), (bottom, height, True, True)):
            size = min(size, length)
            if size == 0:
                continue
            ramp = torch.ones(length, dtype=out.dtype, device=out.device)
            steps = torch.arange(1, size + 1, dtype=out.dtype, device=out.device) / size
            if from_end:
                ramp[length - size:] = steps.flip(0)
            else:
                ramp[:size] = steps
            out *= ramp[None, :, None] if along_rows else ramp[None, None, :]
        return (out,)


def _grow_once(mask, tapered: bool, shrink: bool):
    """One step of a 3x3 grey dilation (erosion when shrink); pixels outside the mask are ignored.

    Tapered corners use the 4-neighbour cross, so repeated steps grow a diamond; otherwise a square."""
    import torch
    import torch.nn.functional as F

    fill = float("inf") if shrink else float("-inf")
    padded = F.pad(mask[:, None], (1, 1, 1, 1), value=fill)[:, 0]
    height, width = mask.shape[1], mask.shape[2]
    offsets = [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)]
    if not tapered:
        offsets += [(0, 0), (0, 2), (2, 0), (2, 2)]
    shifted = torch.stack([padded[:, dy:dy + height, dx:dx + width] for dy, dx in offsets])
    return shifted.amin(0) if shrink else shifted.amax(0)


class GrowMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK",),
            "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "tapered_corners": ("BOOLEAN", {"default": True}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "expand_mask"
    CATEGORY = "mask"

    def expand_mask(self, mask, expand, tapered_corners):
        out = _batched(mask).float()
        # Past height + width steps nothing changes any more: stop there.
        steps = min(abs(expand), out.shape[1] + out.shape[2])
        for _ in range(steps):
            out = _grow_once(out, tapered_corners, shrink=expand < 0)
        return (out,)


class ThresholdMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",),
                             "value": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    def image_to_mask(self, mask, value):
        return ((mask > value).float(),)


class ImageColorToMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    def image_to_mask(self, image, color):
        import torch

        levels = (image[..., :3].clamp(0, 1) * 255.0).round().to(torch.int64)
        packed = (levels[..., 0] << 16) + (levels[..., 1] << 8) + levels[..., 2]
        return ((packed == color).float(),)


class MaskComposite:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"destination": ("MASK",), "source": ("MASK",), "x": _position(), "y": _position(),
                             "operation": (list(MASK_OPERATIONS),)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "combine"
    CATEGORY = "mask"

    def combine(self, destination, source, x, y, operation):
        import torch

        if operation not in MASK_OPERATIONS:
            raise ValueError(f"MaskComposite: unknown operation {operation!r}; one of {MASK_OPERATIONS}")
        out = _batched(destination).clone()
        source = _batched(source).to(out.device, out.dtype)
        if source.shape[0] > out.shape[0]:
            out = _repeat_to_batch(out, source.shape[0]).clone()
        bottom, right = min(y + source.shape[1], out.shape[1]), min(x + source.shape[2], out.shape[2])
        if bottom <= y or right <= x:
            return (out.clamp(0.0, 1.0),)  # the source lies entirely outside the destination
        below = out[:, y:bottom, x:right]
        above = source[:, :bottom - y, :right - x]
        if operation == "multiply":
            result = below * above
        elif operation == "add":
            result = below + above
        elif operation == "subtract":
            result = below - above
        else:  # logical operations on masks rounded to 0 or 1
            logic = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
            result = logic(below.round().bool(), above.round().bool()).to(out.dtype)
        out[:, y:bottom, x:right] = result
        return (out.clamp(0.0, 1.0),)


class MaskPreview(PreviewImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    FUNCTION = "execute"
    CATEGORY = "mask"
    DESCRIPTION = "Shows the masks as greyscale images without keeping them (temp directory)."

    def execute(self, mask, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        grey = _batched(mask)[..., None].expand(-1, -1, -1, 3)
        return self.save_images(grey, filename_prefix, prompt, extra_pnginfo)


# -- alpha compositing -----------------------------------------------------------------------------------

def _porter_duff(mode: str, src, src_a, dst, dst_a):
    """Porter-Duff / W3C compositing of premultiplied colours: returns (colour, alpha), premultiplied."""
    import torch

    both = src_a + dst_a - src_a * dst_a
    if mode == "ADD":
        return (src + dst).clamp(0, 1), (src_a + dst_a).clamp(0, 1)
    if mode == "CLEAR":
        return torch.zeros_like(dst), torch.zeros_like(dst_a)
    if mode == "DARKEN":
        return (1 - dst_a) * src + (1 - src_a) * dst + torch.minimum(src, dst), both
    if mode == "LIGHTEN":
        return (1 - dst_a) * src + (1 - src_a) * dst + torch.maximum(src, dst), both
    if mode == "MULTIPLY":
        return src * dst, src_a * dst_a
    if mode == "SCREEN":
        return src + dst - src * dst, both
    if mode == "OVERLAY":
        return torch.where(2 * dst < dst_a, 2 * src * dst, src_a * dst_a - 2 * (dst_a - src) * (src_a - dst)), both
    table = {  # mode: (source weight, destination weight, output alpha)
        "SRC": (1, 0, src_a),
        "DST": (0, 1, dst_a),
        "SRC_OVER": (1, 1 - src_a, src_a + (1 - src_a) * dst_a),
        "DST_OVER": (1 - dst_a, 1, dst_a + (1 - dst_a) * src_a),
        "SRC_IN": (dst_a, 0, src_a * dst_a),
        "DST_IN": (0, src_a, src_a * dst_a),
        "SRC_OUT": (1 - dst_a, 0, (1 - dst_a) * src_a),
        "DST_OUT": (0, 1 - src_a, (1 - src_a) * dst_a),
        "SRC_ATOP": (dst_a, 1 - src_a, dst_a),
        "DST_ATOP": (1 - dst_a, src_a, src_a),
        "XOR": (1 - dst_a, 1 - src_a, (1 - dst_a) * src_a + (1 - src_a) * dst_a),
    }
    if mode not in table:
        raise ValueError(f"PorterDuffImageComposite: unknown mode {mode!r}; one of {PORTER_DUFF_MODES}")
    src_weight, dst_weight, alpha = table[mode]
    return src_weight * src + dst_weight * dst, alpha


def _fit(tensor, height: int, width: int):
    """[H,W,C] resized (bicubic, centre crop) to height x width when it differs, as ComfyUI fits its inputs."""
    if tensor.shape[0] == height and tensor.shape[1] == width:
        return tensor
    return upscale(tensor.movedim(-1, 0)[None], width, height, "bicubic", "center")[0].movedim(0, -1)


class PorterDuffImageComposite:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": ("IMAGE", {}),
            "source_alpha": ("MASK", {}),
            "destination": ("IMAGE", {}),
            "destination_alpha": ("MASK", {}),
            "mode": _combo(PORTER_DUFF_MODES, default="DST"),
        }}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "composite"
    CATEGORY = "mask/compositing"

    def composite(self, source, source_alpha, destination, destination_alpha, mode):
        import torch

        if mode not in PORTER_DUFF_MODES:
            raise ValueError(f"PorterDuffImageComposite: unknown mode {mode!r}; one of {PORTER_DUFF_MODES}")
        source_alpha, destination_alpha = _batched(source_alpha), _batched(destination_alpha)
        count = min(len(source), len(source_alpha), len(destination), len(destination_alpha))
        images, masks = [], []
        for i in range(count):
            dst = destination[i]
            if source[i].shape[-1] != dst.shape[-1]:
                raise ValueError(f"PorterDuffImageComposite: source has {source[i].shape[-1]} channels, "
                                 f"destination {dst.shape[-1]}; they must match")
            height, width = dst.shape[0], dst.shape[1]
            dst_a = _fit(destination_alpha[i][..., None], height, width)
            src = _fit(source[i], height, width)
            src_a = _fit(source_alpha[i][..., None], dst_a.shape[0], dst_a.shape[1])
            src_a, dst_a = 1 - src_a, 1 - dst_a  # masks to alpha
            colour, alpha = _porter_duff(mode, src * src_a, src_a, dst * dst_a, dst_a)
            colour = torch.where(alpha > 1e-5, colour / alpha, torch.zeros_like(colour)).clamp(0, 1)
            images.append(colour)
            masks.append(1 - alpha[..., 0])
        return (torch.stack(images), torch.stack(masks))


class SplitImageWithAlpha:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "split"
    CATEGORY = "mask/compositing"

    def split(self, image):
        import torch

        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return (image[..., :3], 1.0 - alpha)


class JoinImageWithAlpha:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {}), "alpha": ("MASK", {})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "join"
    CATEGORY = "mask/compositing"

    def join(self, image, alpha):
        import torch
        import torch.nn.functional as F

        alpha = _batched(alpha).to(image.device, image.dtype)
        batch = max(len(image), len(alpha))
        image, alpha = _repeat_to_batch(image, batch), _repeat_to_batch(alpha, batch)
        alpha = F.interpolate(alpha[:, None], size=image.shape[1:3], mode="bilinear")[:, 0]
        return (torch.cat((image[..., :3], (1.0 - alpha)[..., None]), dim=-1),)


NODE_CLASS_MAPPINGS = {
    "CropMask": CropMask,
    "FeatherMask": FeatherMask,
    "GrowMask": GrowMask,
    "ThresholdMask": ThresholdMask,
    "ImageColorToMask": ImageColorToMask,
    "MaskComposite": MaskComposite,
    "MaskPreview": MaskPreview,
    "PorterDuffImageComposite": PorterDuffImageComposite,
    "SplitImageWithAlpha": SplitImageWithAlpha,
    "JoinImageWithAlpha": JoinImageWithAlpha,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PorterDuffImageComposite": "Porter-Duff Image Composite",
    "SplitImageWithAlpha": "Split Image with Alpha",
    "JoinImageWithAlpha": "Join Image with Alpha",
}
