"""Training-data loaders: LoadImageSetFromFolderNode (a folder of images as one IMAGE batch) and
LoadImageTextSetFromFolderNode (the same with a caption per image, encoded by a CLIP), as ComfyUI's nodes_train.

The "folder" combo lists the input directory's subfolders (paths.Folders.input_folders, filled per request).
Every image takes the size of the first one (or the width/height asked for); images of another size are
stretched ("Stretch" and, as in ComfyUI, "Pad"), cut from the top-left corner ("Crop", zero outside the source),
or refused ("None"). Captions are "<image name>.txt" beside each image; kohya-style subfolders "<repeats>_<name>"
count their images <repeats> times. Standard library only at module level.
"""

from __future__ import annotations

import os

from .. import paths

RESIZE_METHODS = ["None", "Stretch", "Crop", "Pad"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _folder_path(folder: str) -> str:
    root = paths.current().input
    path = paths.safe_join(root, folder)
    if path is None or not os.path.isdir(path):
        raise ValueError(f"folder {folder!r} is not a subfolder of the input directory")
    return path


def _images_in(directory: str) -> list[str]:
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(directory, name)))


def _images_with_repeats(directory: str) -> list[str]:
    """Top-level images, then each subfolder's images repeated by its kohya prefix ("10_cat" -> 10 times)."""
    files = _images_in(directory)
    for name in sorted(os.listdir(directory)):
        sub = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isdir(sub):
            continue
        prefix = name.split("_")[0]
        repeats = int(prefix) if prefix.isdigit() else 1
        files.extend(_images_in(sub) * repeats)
    return files


def load_image_batch(files: list[str], resize_method: str = "None", width: int | None = None,
                     height: int | None = None):
    """RGB images as one [B,H,W,3] float batch in 0..1, all brought to the first image's (or the given) size."""
    import numpy as np
    import torch
    from PIL import Image

    from .image_files import _pillow, _scale_wide_integers

    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize_method {resize_method!r}; expected one of {RESIZE_METHODS}")
    if not files:
        raise ValueError("No valid images found in input (png, jpg, jpeg or webp files)")
    batch = []
    for file in files:
        picture = _scale_wide_integers(_pillow(Image.open, file)).convert("RGB")
        if width is None or height is None:  # the first image fixes what was not given
            width = width or picture.size[0]
            height = height or picture.size[1]
        if picture.size != (width, height):
            if resize_method in ("Stretch", "Pad"):  # ComfyUI's "Pad" stretches too
                picture = picture.resize((width, height), Image.Resampling.LANCZOS)
            elif resize_method == "Crop":
                picture = picture.crop((0, 0, width, height))
            else:
                raise ValueError(f"{os.path.basename(file)} is {picture.size[0]}x{picture.size[1]}, not "
                                 f"{width}x{height} like the first image: choose a resize_method other than None "
                                 "or use images of one size")
        batch.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0))
    return torch.stack(batch)


def read_caption(image_path: str) -> str:
    caption = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(caption):
        return ""
    with open(caption, encoding="utf-8") as handle:
        return handle.read().strip()


_RESIZE_INPUT = (RESIZE_METHODS, {"default": "None"})


class LoadImageSetFromFolderNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": (paths.current().input_folders(),
                                        {"tooltip": "The folder to load images from."})},
                "optional": {"resize_method": _RESIZE_INPUT}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "load_images"
    CATEGORY = "loaders"
    EXPERIMENTAL = True
    DESCRIPTION = "Loads a batch of images from a directory for training."

    def load_images(self, folder, resize_method="None"):
        return (load_image_batch(_images_in(_folder_path(folder)), resize_method),)


def _size_input(what: str) -> tuple:
    return ("INT", {"default": -1, "min": -1, "max": 10000, "step": 1,
                    "tooltip": f"The {what} to resize the images to. -1 means use the original {what}."})


class LoadImageTextSetFromFolderNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": (paths.current().input_folders(),
                                        {"tooltip": "The folder to load images from."}),
                             "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})},
                "optional": {"resize_method": _RESIZE_INPUT, "width": _size_input("width"),
                             "height": _size_input("height")}}

    RETURN_TYPES = ("IMAGE", "CONDITIONING")
    FUNCTION = "load_images"
    CATEGORY = "loaders"
    EXPERIMENTAL = True
    DESCRIPTION = "Loads a batch of images and caption from a directory for training."

    def load_images(self, folder, clip, resize_method="None", width=-1, height=-1):
        if clip is None:
            raise RuntimeError("clip input is invalid: None. If it comes from a checkpoint loader, the "
                               "checkpoint has no text encoder.")
        files = _images_with_repeats(_folder_path(folder))
        images = load_image_batch(files, resize_method, None if width == -1 else width,
                                  None if height == -1 else height)
        encoded: dict[str, tuple] = {}  # repeated images share one encoding
        conditioning = []
        for file in files:
            caption = read_caption(file)
            if caption not in encoded:
                cond, pooled = clip.encode(caption)
                encoded[caption] = (cond, pooled)
            cond, pooled = encoded[caption]
            conditioning.append([cond, {"pooled_output": pooled}])
        return (images, conditioning)


NODE_CLASS_MAPPINGS = {
    "LoadImageSetFromFolderNode": LoadImageSetFromFolderNode,
    "LoadImageTextSetFromFolderNode": LoadImageTextSetFromFolderNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImageSetFromFolderNode": "Load Image Dataset from Folder",
    "LoadImageTextSetFromFolderNode": "Load Image and Text Dataset from Folder",
}
