"""ComfyUI's CLIP weight methods (add_patches, get_key_patches, model_state_dict) for this server's TextEncoder.

Keys are ComfyUI's: "<encoder>.transformer.text_model.<transformers name>" for each encoder (clip_l, clip_h,
clip_g), and "<encoder>.transformer.text_projection.weight" for the projection, which ComfyUI stores as a Linear
weight [P, width] where ours is OpenCLIP's [width, P] (transposed in both directions here).

The functions change the clone they are given, like ComfyUI's ModelPatcher (the TextEncoder dataclass is frozen;
its patch tuple is replaced). TextEncoder may expose them as methods (see the module's report note).
"""

from __future__ import annotations

ENCODER_NAMES = ("clip_l", "clip_h", "clip_g")
TEXT_MODEL = ".transformer.text_model."
PROJECTION_KEY = ".transformer.text_projection.weight"


def _encoders(clip) -> dict:
    """{encoder name: CLIPTextModel} of the clip's network, with the clip's own patches applied."""
    from .patching import patched_module

    network = patched_module(clip.handle, clip.patches)
    return {name: getattr(network, name) for name in ENCODER_NAMES if hasattr(network, name)}


def comfy_key(encoder: str, name: str) -> str:
    if name == "text_projection":
        return encoder + PROJECTION_KEY
    return encoder + TEXT_MODEL + name


def our_name(key: str) -> tuple[str, str] | None:
    """(encoder, parameter name) of a ComfyUI CLIP key; None for keys of no encoder we have."""
    encoder, _, rest = key.partition(".")
    if encoder not in ENCODER_NAMES:
        return None
    if "." + rest == PROJECTION_KEY:
        return encoder, "text_projection"
    if ("." + rest).startswith(TEXT_MODEL):
        return encoder, rest[len(TEXT_MODEL) - 1:]
    return None


def model_state_dict(clip, filter_prefix=None) -> dict:
    """The clip's weights (with its patches) under ComfyUI's names."""
    weights = {}
    for encoder, module in _encoders(clip).items():
        for name, value in module.state_dict().items():
            weights[comfy_key(encoder, name)] = value.t() if name == "text_projection" else value
    if filter_prefix is not None:
        weights = {key: value for key, value in weights.items() if key.startswith(filter_prefix)}
    return {key: value.detach() for key, value in weights.items()}


def get_key_patches(clip, filter_prefix=None) -> dict:
    """{key: (weight,)}: the weights as this clip computes them, ready for another clip's add_patches."""
    return {key: (value,) for key, value in model_state_dict(clip, filter_prefix).items()}


def add_patches(clip, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
    """Per key, weight = weight * strength_model + strength_patch * value (or "set"); keys of weights the clip
    does not have are ignored, as ComfyUI does. Returns the keys that were patched."""
    from .patcher_api import _patch_value
    from .patching import KeyPatch

    known = {encoder: set(module.state_dict()) for encoder, module in _encoders(clip).items()}
    targets: dict = {}
    added = []
    for key, value in patches.items():
        found = our_name(key)
        if found is None or found[1] not in known.get(found[0], ()):
            continue
        encoder, name = found
        kind, tensor = _patch_value(key, value)
        if name == "text_projection" and tensor is not None and tensor.ndim == 2:
            tensor = tensor.t()
        targets.setdefault(encoder, {})[name] = (kind, tensor, strength_patch, strength_model)
        added.append(key)
    if targets:
        object.__setattr__(clip, "patches", clip.patches + (KeyPatch(targets),))
    return added
