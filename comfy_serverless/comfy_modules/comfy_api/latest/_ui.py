"""`ui` helpers for V3 nodes (`from comfy_api.latest import ui`): results a node shows in its history entry
and `executed` message, e.g. `{"images": [{"filename", "subfolder", "type"}]}` or `{"text": ["..."]}`.

Images are written the way this server's SaveImage and PreviewImage write them (nodes/image_files.py: the same
file names, counters, PNG text chunks and atomic writes). torch, numpy and PIL are imported only when an image
is saved. Audio needs an encoder this server does not ship, so the audio helpers raise a clear error.
"""

from __future__ import annotations

import json
import os
import random
import string

from comfy_serverless import paths, settings
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes import image_files

from ._io import FolderType, _UIOutput


class SavedResult(dict):
    """One saved file as the frontend addresses it: {"filename", "subfolder", "type"}."""

    def __init__(self, filename: str, subfolder: str, type: FolderType | str):
        super().__init__(filename=filename, subfolder=subfolder, type=FolderType(type).value)

    @property
    def filename(self) -> str:
        return self["filename"]

    @property
    def subfolder(self) -> str:
        return self["subfolder"]

    @property
    def type(self) -> FolderType:
        return FolderType(self["type"])


class SavedImages(_UIOutput):
    def __init__(self, results: list, is_animated: bool = False):
        self.results = results
        self.is_animated = is_animated

    def as_dict(self) -> dict:
        data: dict = {"images": list(self.results)}
        if self.is_animated:
            data["animated"] = [True]
        return data


class SavedAudios(_UIOutput):
    def __init__(self, results: list):
        self.results = results

    def as_dict(self) -> dict:
        return {"audio": list(self.results)}


def _directory(folder_type) -> str:
    return paths.current().directory_for(FolderType(folder_type).value)


def _hidden_values(cls):
    hidden = getattr(cls, "hidden", None) if cls is not None else None
    if hidden is None:
        return None, None
    return hidden.prompt, hidden.extra_pnginfo


def _temp_prefix() -> str:
    return "ComfyUI_temp_" + "".join(random.choices(string.ascii_lowercase, k=5))


class ImageSaveHelper:
    """Saving IMAGE batches ([B,H,W,C] floats in 0..1) as PNG, animated PNG or animated WebP."""

    @staticmethod
    def _convert_tensor_to_pil(image):
        return image_files._to_pil(image)

    @staticmethod
    def _create_png_metadata(cls):
        if cls is None or getattr(cls, "hidden", None) is None:
            return None
        return image_files._png_metadata(*_hidden_values(cls))

    @staticmethod
    def save_images(images, filename_prefix: str, folder_type: FolderType, cls=None,
                    compress_level: int = 4) -> list:
        root = _directory(folder_type)
        folder, base, counter, subfolder = image_files.save_image_path(
            filename_prefix, root, images[0].shape[1], images[0].shape[0])
        metadata = ImageSaveHelper._create_png_metadata(cls)
        results = []
        for batch_number, image in enumerate(images):
            name = f"{base.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            with paths.atomic_path(os.path.join(folder, name)) as partial:
                image_files._to_pil(image).save(partial, format="PNG", pnginfo=metadata,
                                                compress_level=compress_level)
            results.append(SavedResult(name, subfolder, folder_type))
            counter += 1
        return results

    @staticmethod
    def get_save_images_ui(images, filename_prefix: str, cls=None, compress_level: int = 4) -> SavedImages:
        return SavedImages(ImageSaveHelper.save_images(images, filename_prefix, FolderType.output, cls,
                                                       compress_level))

    @staticmethod
    def save_animated_png(images, filename_prefix: str, folder_type: FolderType, cls=None, fps: float = 6.0,
                          compress_level: int = 4) -> SavedResult:
        from PIL.PngImagePlugin import PngInfo

        root = _directory(folder_type)
        folder, base, counter, subfolder = image_files.save_image_path(
            filename_prefix, root, images[0].shape[1], images[0].shape[0])
        frames = [image_files._to_pil(image) for image in images]
        metadata = None
        prompt, extra = _hidden_values(cls)
        if not settings.current().disable_metadata and (prompt is not None or extra):
            metadata = PngInfo()  # APNG: text after the image data, in "comf" chunks, as ComfyUI writes them
            if prompt is not None:
                metadata.add(b"comf", b"prompt\0" + json.dumps(prompt).encode("latin-1", "strict"),
                             after_idat=True)
            for key, value in (extra or {}).items():
                metadata.add(b"comf", key.encode("latin-1", "strict") + b"\0"
                             + json.dumps(value).encode("latin-1", "strict"), after_idat=True)
        name = f"{base}_{counter:05}_.png"
        with paths.atomic_path(os.path.join(folder, name)) as partial:
            frames[0].save(partial, format="PNG", pnginfo=metadata, compress_level=compress_level, save_all=True,
                           duration=int(1000.0 / fps), append_images=frames[1:])
        return SavedResult(name, subfolder, folder_type)

    @staticmethod
    def get_save_animated_png_ui(images, filename_prefix: str, cls=None, fps: float = 6.0,
                                 compress_level: int = 4) -> SavedImages:
        result = ImageSaveHelper.save_animated_png(images, filename_prefix, FolderType.output, cls, fps,
                                                   compress_level)
        return SavedImages([result], is_animated=len(images) > 1)

    @staticmethod
    def save_animated_webp(images, filename_prefix: str, folder_type: FolderType, cls=None, fps: float = 6.0,
                           lossless: bool = False, quality: int = 80, method: int = 4) -> SavedResult:
        root = _directory(folder_type)
        folder, base, counter, subfolder = image_files.save_image_path(
            filename_prefix, root, images[0].shape[1], images[0].shape[0])
        frames = [image_files._to_pil(image) for image in images]
        exif = frames[0].getexif()
        prompt, extra = _hidden_values(cls)
        if not settings.current().disable_metadata:
            if prompt is not None:
                exif[0x0110] = f"prompt:{json.dumps(prompt)}"  # the EXIF Model tag, where ComfyUI puts it
            tag = 0x010F  # Make, then downwards for each extra_pnginfo key
            for key, value in (extra or {}).items():
                exif[tag] = f"{key}:{json.dumps(value)}"
                tag -= 1
        name = f"{base}_{counter:05}_.webp"
        with paths.atomic_path(os.path.join(folder, name)) as partial:
            frames[0].save(partial, format="WEBP", save_all=True, duration=int(1000.0 / fps),
                           append_images=frames[1:], exif=exif, lossless=lossless, quality=quality, method=method)
        return SavedResult(name, subfolder, folder_type)

    @staticmethod
    def get_save_animated_webp_ui(images, filename_prefix: str, cls=None, fps: float = 6.0, lossless: bool = False,
                                  quality: int = 80, method: int = 4) -> SavedImages:
        result = ImageSaveHelper.save_animated_webp(images, filename_prefix, FolderType.output, cls, fps, lossless,
                                                    quality, method)
        return SavedImages([result], is_animated=len(images) > 1)


class AudioSaveHelper:
    @staticmethod
    def save_audio(*args, **kwargs):
        raise NotImplementedError("saving audio needs an audio encoder (PyAV), which comfy-serverless does not ship")

    get_save_audio_ui = save_audio


class PreviewImage(_UIOutput):
    """Saves the images to the temp folder (fast PNG) and shows them."""

    def __init__(self, image, animated: bool = False, cls=None, **kwargs):
        self.values = ImageSaveHelper.save_images(image, _temp_prefix(), FolderType.temp, cls, compress_level=1)
        self.animated = animated

    def as_dict(self) -> dict:
        return {"images": list(self.values), "animated": [self.animated]}


class PreviewMask(PreviewImage):
    """A MASK batch ([B,H,W]) shown as grey images."""

    def __init__(self, mask, animated: bool = False, cls=None, **kwargs):
        grey = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        super().__init__(grey, animated, cls, **kwargs)


class PreviewAudio(_UIOutput):
    def __init__(self, audio, cls=None, **kwargs):
        AudioSaveHelper.save_audio(audio)

    def as_dict(self) -> dict:
        return {}


class PreviewVideo(_UIOutput):
    def __init__(self, values: list, **kwargs):
        self.values = values

    def as_dict(self) -> dict:
        return {"images": list(self.values), "animated": [True]}


class PreviewUI3D(_UIOutput):
    def __init__(self, model_file, camera_info, **kwargs):
        self.model_file = model_file
        self.camera_info = camera_info

    def as_dict(self) -> dict:
        return {"result": [self.model_file, self.camera_info]}


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": [self.value]}


def __getattr__(name: str):
    """A name from a later ComfyUI API: a placeholder, so the pack still loads and only what uses it fails
    (catalog/comfy_modules.py); probes such as hasattr see an AttributeError."""
    return missing_attribute(__name__, name)


__all__ = ["SavedResult", "SavedImages", "SavedAudios", "ImageSaveHelper", "AudioSaveHelper", "PreviewImage",
           "PreviewMask", "PreviewAudio", "PreviewVideo", "PreviewUI3D", "PreviewText"]
