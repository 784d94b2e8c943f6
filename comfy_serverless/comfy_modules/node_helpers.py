"""ComfyUI's `node_helpers` for custom node packs: conditioning edits, Pillow with damaged files, file hashing."""

from __future__ import annotations

import hashlib

from comfy_serverless import settings
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.conditioning import with_options
from comfy_serverless.nodes.image_files import _pillow


def conditioning_set_values(conditioning, values: dict | None = None, append: bool = False) -> list:
    """A copy of a CONDITIONING list with `values` set in every entry's options; with append, a value is added
    to what the entry already has under that key (lists grow, numbers add up)."""
    values = values or {}
    if not append:
        return with_options(conditioning, values)
    result = []
    for cond, options in conditioning:
        options = dict(options)
        for key, value in values.items():
            previous = options.get(key)
            options[key] = value if previous is None else previous + value
        result.append([cond, options])
    return result


def pillow(fn, arg):
    """fn(arg) for a PIL function; a damaged image is retried once with truncated images allowed."""
    return _pillow(fn, arg)


def hasher():
    """The hash constructor --default-hashing-function names (sha256 by default)."""
    return getattr(hashlib, settings.current().default_hashing_function)


def string_to_torch_dtype(string: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(string)


def image_alpha_fix(destination, source):
    """Makes source's channel count match destination's: extra channels dropped, a missing alpha made opaque."""
    import torch.nn.functional as F

    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        source = F.pad(source, (0, destination.shape[-1] - source.shape[-1]), value=1.0)
    return destination, source


def __getattr__(name: str):
    return missing_attribute(__name__, name)
