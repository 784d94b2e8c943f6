"""Image file nodes: LoadImage and LoadImageMask read the input folder; SaveImage and PreviewImage write PNGs.

Standard library and light comfy_serverless modules only at module level (torch, numpy and PIL are imported
inside the functions): the server imports packs to validate prompts before torch is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
import time

from .. import paths, progress, settings

MASK_CHANNELS = ["alpha", "red", "green", "blue"]


# -- saving --------------------------------------------------------------------------------------------

def save_image_path(prefix: str, root: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str]:
    """Where a batch goes: (folder, base name, first counter, subfolder) for a filename prefix.

    The prefix may hold %width% %height% %year% %month% %day% %hour% %minute% %second% and directories
    ('a/b/name' saves under root/a/b); a prefix that leaves root is refused.
    """
    if "%" in prefix:
        prefix = _substitute(prefix, width, height)
    subfolder, base = os.path.split(os.path.normpath(prefix))
    folder = paths.safe_join(root, subfolder)
    if folder is None:
        raise ValueError(f"Saving outside the output folder is not allowed (filename_prefix {prefix!r})")
    os.makedirs(folder, exist_ok=True)
    return folder, base, _next_counter(folder, base), subfolder.replace(os.sep, "/")


def _substitute(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "%width%": str(width), "%height%": str(height), "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}", "%day%": f"{now.tm_mday:02}", "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}", "%second%": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


def _next_counter(folder: str, base: str) -> int:
    """One past the highest N of the files named '<base>_<N>...'; 1 when there are none.

    A matching name without a number counts as 0, as in ComfyUI.
    """
    wanted = os.path.normcase(base)
    highest = None
    for name in os.listdir(folder):
        if os.path.normcase(name[:len(base)]) != wanted or name[len(base):len(base) + 1] != "_":
            continue
        digits = name[len(base) + 1:].split("_")[0]
        number = int(digits) if digits.isdigit() else 0
        highest = number if highest is None else max(highest, number)
    return 1 if highest is None else highest + 1


def _to_pil(image):
    """One [H,W,C] image as 8 bits: value*255, clipped, then truncated (0.25 -> 63), as ComfyUI saves."""
    import numpy as np
    from PIL import Image

    pixels = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels)


def _png_metadata(prompt, extra_pnginfo):
    """tEXt chunks: 'prompt' and each extra_pnginfo key as JSON; None with --disable-metadata."""
    if settings.current().disable_metadata:
        return None
    from PIL.PngImagePlugin import PngInfo

    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    return metadata


class SaveImage:
    FOLDER_TYPE = "output"
    COMPRESS_LEVEL = 4

    def __init__(self):
        self.prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {
                    "default": "ComfyUI",
                    "tooltip": "Start of the saved file names. It may contain folders ('renders/cat') and "
                               "%width%, %height%, %year%, %month%, %day%, %hour%, %minute% or %second%."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images as PNG files in the output directory."

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        root = paths.current().directory_for(self.FOLDER_TYPE)
        height, width = images[0].shape[0], images[0].shape[1]
        folder, base, counter, subfolder = save_image_path(filename_prefix + self.prefix_append, root,
                                                           width, height)
        metadata = _png_metadata(prompt, extra_pnginfo)
        results = []
        for batch_number, image in enumerate(images):
            progress.throw_exception_if_processing_interrupted()
            file = f"{base.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            with paths.atomic_path(os.path.join(folder, file)) as partial:
                _to_pil(image).save(partial, format="PNG", pnginfo=metadata, compress_level=self.COMPRESS_LEVEL)
            results.append({"filename": file, "subfolder": subfolder, "type": self.FOLDER_TYPE})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    FOLDER_TYPE = "temp"
    COMPRESS_LEVEL = 1  # previews are thrown away: favour speed over size

    def __init__(self):
        # Random per node instance, so previews of different nodes never share a name series.
        self.prefix_append = "_temp_" + "".join(random.choices(string.ascii_lowercase, k=5))

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": ("IMAGE",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    DESCRIPTION = "Shows the input images without keeping them (they go to the temp directory)."


# -- loading -------------------------------------------------------------------------------------------

def _pillow(function, argument):
    """Calls a PIL function; if the file is damaged, retries once allowing truncated images (as ComfyUI)."""
    from PIL import ImageFile

    try:
        return function(argument)
    except (OSError, ValueError):
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return function(argument)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _scale_wide_integers(picture):
    """16/32-bit integer pictures ('I', 'I;16') scaled by 1/255 as ComfyUI does, so 8-bit conversion works."""
    if picture.mode.startswith("I;16"):
        picture = picture.convert("I")
    if picture.mode == "I":
        picture = picture.point(lambda value: value * (1 / 255))
    return picture


def _alpha_mask(picture):
    """1 - alpha as [H,W] (ComfyUI's mask convention: 1 = transparent); None when there is no alpha."""
    import numpy as np
    import torch

    if "A" in picture.getbands():
        alpha = picture.getchannel("A")
    elif picture.mode == "P" and "transparency" in picture.info:
        alpha = picture.convert("RGBA").getchannel("A")
    else:
        return None
    return 1.0 - torch.from_numpy(np.array(alpha).astype(np.float32) / 255.0)


def _file_sha256(name: str) -> str:
    digest = hashlib.sha256()
    with open(paths.current().resolve_annotated(name), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _validate_image_name(name) -> bool | str:
    if isinstance(name, str) and paths.current().annotated_exists(name):
        return True
    return f"Invalid image file: {name}"


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (paths.current().input_images(), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image):
        import numpy as np
        import torch
        from PIL import Image, ImageOps, ImageSequence

        opened = _pillow(Image.open, paths.current().resolve_annotated(image))
        frames, masks = [], []
        for frame in ImageSequence.Iterator(opened):
            progress.throw_exception_if_processing_interrupted()
            frame = _scale_wide_integers(_pillow(ImageOps.exif_transpose, frame))
            rgb = frame.convert("RGB")
            if frames and rgb.size != (frames[0].shape[2], frames[0].shape[1]):
                continue  # a batch holds one size: frames of another size are dropped
            frames.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
            masks.append(_alpha_mask(frame))
            if opened.format == "MPO":
                break  # a multi-picture JPEG (stereo camera): only the main picture, as ComfyUI
        height, width = frames[0].shape[1], frames[0].shape[2]
        # No alpha: a 64x64 zero mask as ComfyUI; full size when other frames of the batch have alpha.
        blank = (64, 64) if all(m is None for m in masks) else (height, width)
        masks = [torch.zeros(blank, dtype=torch.float32) if m is None else m for m in masks]
        return (torch.cat(frames, dim=0), torch.stack(masks, dim=0))

    @classmethod
    def IS_CHANGED(cls, image):
        return _file_sha256(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _validate_image_name(image)


class LoadImageMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": (paths.current().input_images(), {"image_upload": True}),
            "channel": (MASK_CHANNELS,),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"
    CATEGORY = "mask"

    def load_image(self, image, channel):
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        picture = _pillow(Image.open, paths.current().resolve_annotated(image))
        picture = _pillow(ImageOps.exif_transpose, picture)
        if picture.getbands() != ("R", "G", "B", "A"):
            picture = _scale_wide_integers(picture).convert("RGBA")
        band = channel[0].upper()
        mask = torch.from_numpy(np.array(picture.getchannel(band)).astype(np.float32) / 255.0)
        if band == "A":
            mask = 1.0 - mask  # transparent = 1, like LoadImage's mask; colour channels are taken as they are
        return (mask.unsqueeze(0),)

    @classmethod
    def IS_CHANGED(cls, image, channel):
        return _file_sha256(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _validate_image_name(image)


NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage,
    "LoadImageMask": LoadImageMask,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image",
    "LoadImageMask": "Load Image (as Mask)",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
}
