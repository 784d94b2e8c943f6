"""Animated PNG / WebP saving (ComfyUI's SaveAnimatedPNG and SaveAnimatedWEBP) and LoadImageOutput, LoadImage
over the output folder.

Files land in the output folder through the same naming and atomic writes as SaveImage (image_files.py); the
ui result is SaveImage's plus ComfyUI's `animated` flag. Standard library and light modules only at module level.
"""

from __future__ import annotations

import json
import os

from .. import paths, progress, settings
from .image_files import LoadImage, _to_pil, save_image_path

WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}
_EXIF_MODEL, _EXIF_MAKE = 0x0110, 0x010F


def _frames(images):
    pictures = []
    for image in images:
        progress.throw_exception_if_processing_interrupted()
        pictures.append(_to_pil(image))
    return pictures


def _frame_duration_ms(fps: float) -> int:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return int(1000.0 / fps)


class SaveAnimatedPNG:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "compress_level": ("INT", {"default": 4, "min": 0, "max": 9}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"

    def save_images(self, images, fps, compress_level, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        from PIL.PngImagePlugin import PngInfo

        root = paths.current().directory_for("output")
        folder, base, counter, subfolder = save_image_path(filename_prefix, root, images[0].shape[1],
                                                           images[0].shape[0])
        duration = _frame_duration_ms(fps)
        pictures = _frames(images)
        metadata = None
        if not settings.current().disable_metadata:
            # ComfyUI's private 'comf' chunks after the image data: "<key>\0<json>", Latin-1.
            metadata = PngInfo()
            entries = ([("prompt", prompt)] if prompt is not None else []) + list((extra_pnginfo or {}).items())
            for key, value in entries:
                payload = key.encode("latin-1") + b"\0" + json.dumps(value).encode("latin-1")
                metadata.add(b"comf", payload, after_idat=True)
        file = f"{base}_{counter:05}_.png"
        with paths.atomic_path(os.path.join(folder, file)) as partial:
            pictures[0].save(partial, format="PNG", pnginfo=metadata, compress_level=compress_level, save_all=True,
                             duration=duration, append_images=pictures[1:])
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                       "animated": [True]}}


class SaveAnimatedWEBP:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "lossless": ("BOOLEAN", {"default": True}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                "method": (list(WEBP_METHODS),),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"

    def save_images(self, images, fps, filename_prefix, lossless, quality, method, num_frames=0, prompt=None,
                    extra_pnginfo=None):
        if method not in WEBP_METHODS:
            raise ValueError(f"SaveAnimatedWEBP: unknown method {method!r}; one of {list(WEBP_METHODS)}")
        root = paths.current().directory_for("output")
        folder, base, counter, subfolder = save_image_path(filename_prefix, root, images[0].shape[1],
                                                           images[0].shape[0])
        duration = _frame_duration_ms(fps)
        pictures = _frames(images)
        exif = pictures[0].getexif()
        if not settings.current().disable_metadata:
            # As ComfyUI: the prompt in EXIF Model, each extra_pnginfo entry in the tags counting down from Make.
            if prompt is not None:
                exif[_EXIF_MODEL] = f"prompt:{json.dumps(prompt)}"
            for offset, (key, value) in enumerate((extra_pnginfo or {}).items()):
                exif[_EXIF_MAKE - offset] = f"{key}:{json.dumps(value)}"
        per_file = num_frames or len(pictures)
        results = []
        for start in range(0, len(pictures), per_file):
            file = f"{base}_{counter:05}_.webp"
            with paths.atomic_path(os.path.join(folder, file)) as partial:
                pictures[start].save(partial, format="WEBP", save_all=True, duration=duration,
                                     append_images=pictures[start + 1:start + per_file], exif=exif,
                                     lossless=lossless, quality=quality, method=WEBP_METHODS[method])
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results, "animated": [per_file != 1]}}


class LoadImageOutput(LoadImage):
    """LoadImage whose names come from the output folder: 'name.png [output]' (the annotation picks the
    folder; a name without one is looked up in the input folder, as ComfyUI does)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("COMBO", {
            "image_upload": True,
            "image_folder": "output",
            "remote": {"route": "/internal/files/output", "refresh_button": True, "control_after_refresh": "first"},
        })}}

    DESCRIPTION = ("Load an image from the output folder. When the refresh button is clicked, the node will update "
                   "the image list and automatically select the first image, allowing for easy iteration.")
    EXPERIMENTAL = True


NODE_CLASS_MAPPINGS = {
    "SaveAnimatedPNG": SaveAnimatedPNG,
    "SaveAnimatedWEBP": SaveAnimatedWEBP,
    "LoadImageOutput": LoadImageOutput,
}

NODE_DISPLAY_NAME_MAPPINGS = {"LoadImageOutput": "Load Image (from Outputs)"}
