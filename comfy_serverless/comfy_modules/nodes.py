"""ComfyUI's `nodes` for custom node packs: the node registry, the core node classes under their ComfyUI names,
and the helpers packs import from it.

`NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS` are live views of what catalog/packs.py has imported: every
built-in node, then each custom pack's nodes (a built-in name is never overridden), so a pack that keeps a
reference from import time sees packs imported after it. Entries a pack writes into them are kept in the view
but register no node (this server's catalogue is built from each pack's own NODE_CLASS_MAPPINGS).
"""

from __future__ import annotations

from collections.abc import MutableMapping

from comfy_serverless import progress
from comfy_serverless.catalog import packs
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes import image_files, sampling_nodes
from comfy_serverless.nodes.conditioning import (  # noqa: F401  (ComfyUI's names, for packs)
    CLIPSetLastLayer,
    CLIPTextEncode,
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
    ConditioningZeroOut,
    InpaintModelConditioning,
)
from comfy_serverless.nodes.image_files import LoadImage, LoadImageMask  # noqa: F401
from comfy_serverless.nodes.images import (  # noqa: F401
    EmptyImage,
    ImageBatch,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
)
from comfy_serverless.nodes.latents import (  # noqa: F401
    EmptyLatentImage,
    LatentBlend,
    LatentComposite,
    LatentCrop,
    LatentFlip,
    LatentFromBatch,
    LatentRotate,
    LatentUpscale,
    LatentUpscaleBy,
    LoadLatent,
    RepeatLatentBatch,
    SaveLatent,
    SetLatentNoiseMask,
)
from comfy_serverless.nodes.loaders import (  # noqa: F401
    CheckpointLoader,
    CheckpointLoaderSimple,
    LoraLoader,
    LoraLoaderModelOnly,
    VAELoader,
)
from comfy_serverless.nodes.sampling_nodes import KSampler, KSamplerAdvanced  # noqa: F401
from comfy_serverless.nodes.vae_nodes import (  # noqa: F401
    VAEDecode,
    VAEDecodeTiled,
    VAEEncode,
    VAEEncodeForInpaint,
    VAEEncodeTiled,
)

MAX_RESOLUTION = 16384

# Class attributes of ComfyUI's core nodes that packs read (`nodes.ImageScale.upscale_methods` in an INPUT_TYPES).
_IMAGE_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
_CROP_METHODS = ["disabled", "center"]
for _node, _methods in ((ImageScale, _IMAGE_UPSCALE_METHODS), (ImageScaleBy, _IMAGE_UPSCALE_METHODS),
                        (LatentUpscale, _LATENT_UPSCALE_METHODS), (LatentUpscaleBy, _LATENT_UPSCALE_METHODS)):
    if not hasattr(_node, "upscale_methods"):
        _node.upscale_methods = list(_methods)
for _node in (ImageScale, LatentUpscale):
    if not hasattr(_node, "crop_methods"):
        _node.crop_methods = list(_CROP_METHODS)


class _SavesWhereTheInstanceSays:
    """ComfyUI's SaveImage/PreviewImage read `self.type`, `self.output_dir` and `self.compress_level`, which pack
    subclasses set in their own __init__ (a mask preview saving to temp); the built-in node reads class
    attributes, so the instance's choices are carried over before saving."""

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        output_dir = getattr(self, "output_dir", None)
        folder_type = _folder_type_of(output_dir) if output_dir is not None else getattr(self, "type", None)
        if folder_type is not None:
            self.FOLDER_TYPE = folder_type
        if getattr(self, "compress_level", None) is not None:
            self.COMPRESS_LEVEL = self.compress_level
        return super().save_images(images, filename_prefix, prompt, extra_pnginfo)


def _folder_type_of(directory: str) -> str | None:
    import os

    from comfy_serverless import paths

    current = paths.current()
    for kind in ("output", "temp", "input"):
        if os.path.realpath(current.directory_for(kind)) == os.path.realpath(directory):
            return kind
    raise ValueError(f"SaveImage subclass: output_dir {directory!r} is not this server's output, temp or input "
                     "directory, which are the only folders it saves to")


class SaveImage(_SavesWhereTheInstanceSays, image_files.SaveImage):
    pass


class PreviewImage(_SavesWhereTheInstanceSays, image_files.PreviewImage):
    pass


_ADAPTED_BUILTINS = {"SaveImage": SaveImage, "PreviewImage": PreviewImage}

# Folders of packs' web extensions and of loaded packs, as ComfyUI keeps them; informational here.
EXTENSION_WEB_DIRS: dict[str, str] = {}
LOADED_MODULE_DIRS: dict[str, str] = {}


_builtins_imported = False


class _Registry(MutableMapping):
    """The merged node registry of every imported pack: built-ins first, then custom packs in import order."""

    def __init__(self, field: str):
        self._field = field  # "classes" or "display_names"
        self._written: dict = {}
        self._cache: tuple | None = None

    def _merged(self) -> dict:
        global _builtins_imported
        if not _builtins_imported:
            for module in packs.BUILTIN_PACKS:
                packs.import_pack(f"builtin:{module}")  # light modules: no torch at import
            _builtins_imported = True
        imported = list(packs._imported.values())
        stamp = (len(imported), len(self._written))
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        builtin = [p for p in imported if p is not None and p.is_builtin]
        custom = [p for p in imported if p is not None and not p.is_builtin]
        reserved = {name for p in builtin for name in p.classes}
        merged: dict = {}
        for pack in builtin + custom:
            for name, value in getattr(pack, self._field).items():
                if pack.is_builtin or name not in reserved:
                    merged[name] = value
        for name, adapter in _ADAPTED_BUILTINS.items():  # `NODE_CLASS_MAPPINGS["SaveImage"] is nodes.SaveImage`
            if merged.get(name) is adapter.__mro__[2]:
                merged[name] = adapter
        merged.update(self._written)
        self._cache = (stamp, merged)
        return merged

    def __getitem__(self, name):
        return self._merged()[name]

    def __setitem__(self, name, value) -> None:
        self._written[name] = value
        self._cache = None

    def __delitem__(self, name) -> None:
        del self._written[name]
        self._cache = None

    def __iter__(self):
        return iter(list(self._merged()))

    def __len__(self) -> int:
        return len(self._merged())

    def __contains__(self, name) -> bool:
        return name in self._merged()

    def copy(self) -> dict:
        return dict(self._merged())

    def __repr__(self) -> str:
        return repr(self._merged())


NODE_CLASS_MAPPINGS = _Registry("classes")
NODE_DISPLAY_NAME_MAPPINGS = _Registry("display_names")


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
                    disable_noise=False, start_step=None, last_step=None, force_full_denoise=False):
    """KSampler's work as a function: returns (latent dict with new samples,), with progress per step."""
    return sampling_nodes.common_ksampler(
        model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=denoise,
        disable_noise=disable_noise, start_step=start_step, last_step=last_step,
        force_full_denoise=force_full_denoise)


def before_node_execution() -> None:
    """Raises the interrupt exception when /interrupt was called for the running prompt."""
    progress.throw_exception_if_processing_interrupted()


def interrupt_processing(value: bool = True) -> None:
    """Interrupts (or, with False, un-interrupts) the current server's running prompt."""
    if value:
        progress.request_interrupt()
    else:
        progress.clear_interrupt()


def __getattr__(name: str):
    """Every built-in node class under its node name (`from nodes import ControlNetApplyAdvanced`), as ComfyUI's
    nodes.py names its classes; anything else is a placeholder that names what is missing."""
    NODE_CLASS_MAPPINGS._merged()  # imports the built-in packs once
    for pack in packs._imported.values():
        if pack is not None and pack.is_builtin and name in pack.classes:
            return pack.classes[name]
    return missing_attribute(__name__, name)
