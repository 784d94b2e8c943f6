"""Super-resolution networks for upscale models, recognised from their state dicts.

    detect(state_dict)   which architecture and hyper-parameters a state dict holds (UpscalerInfo), or
                         UnsupportedUpscaler naming what was found
    build(state_dict)    (network in eval mode, UpscalerInfo)

Recognised: ESRGAN's RRDBNet in the original ("model.0.weight") and the BasicSR / Real-ESRGAN ("conv_first")
layouts, any scale that is a power of two, pixel-unshuffle variants (x2plus, 1x), Real-ESRGAN's compact
SRVGGNetCompact, and SPAN. One module per architecture; this one only dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedUpscaler(ValueError):
    """A state dict that is no upscale model this server can build; the message says what it looks like."""


@dataclass(frozen=True)
class UpscalerInfo:
    architecture: str  # "ESRGAN", "RealESRGAN-Compact" or "SPAN"
    layout: str  # how the file names its weights
    scale: int
    input_channels: int
    output_channels: int
    multiple_of: int  # input height and width must be multiples of this (padded otherwise)
    minimum: int  # and at least this (spandrel's size requirements, so tiles are padded as in ComfyUI)
    config: object  # the architecture's config dataclass


# Key fragments of architectures that are recognised by name only, to say what a refused file is.
_KNOWN_OTHERS = (
    ("layers.0.residual_group.blocks.0", "SwinIR/HAT (transformer)"),
    ("residual_layer.0.residual_layer", "OmniSR"),
    ("layers.0.blocks.0.attn", "a Swin transformer (DAT/SwinIR?)"),
    ("stylegan_decoder.", "GFPGAN (face restoration)"),
    ("quantize.embedding", "CodeFormer (face restoration)"),
    ("input_hint_block.", "a ControlNet"),
    ("model.diffusion_model.", "a Stable Diffusion checkpoint"),
    ("encoder.down.", "a VAE"),
)


def without_module_prefix(state_dict: dict) -> dict:
    """Weights saved from torch's DataParallel carry "module." on every key."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def _describe(state_dict: dict) -> str:
    for fragment, name in _KNOWN_OTHERS:
        if any(fragment in key for key in state_dict):
            return f"it looks like {name}"
    sample = ", ".join(repr(key) for key in list(state_dict)[:4])
    return f"{len(state_dict)} tensors, e.g. {sample}"


def detect(state_dict: dict) -> UpscalerInfo:
    from . import compact, rrdbnet, span

    state_dict = without_module_prefix(state_dict)
    try:
        if rrdbnet.is_esrgan_layout(state_dict) or rrdbnet.is_basicsr_layout(state_dict):
            layout = "ESRGAN" if rrdbnet.is_esrgan_layout(state_dict) else "BasicSR"
            named = rrdbnet.from_esrgan_layout(state_dict) if layout == "ESRGAN" else state_dict
            config = rrdbnet.config_from_state_dict(named)
            return UpscalerInfo("ESRGAN", layout, config.scale, config.in_channels, config.out_channels,
                                4 if config.unshuffle > 1 else 1, 2, config)
        if compact.is_compact_layout(state_dict):
            config = compact.config_from_state_dict(state_dict)
            return UpscalerInfo("RealESRGAN-Compact", "BasicSR", config.scale, config.in_channels,
                                config.out_channels, 1, 0, config)
        if span.is_span_layout(state_dict):
            config = span.config_from_state_dict(state_dict)
            return UpscalerInfo("SPAN", "SPAN", config.scale, config.in_channels, config.out_channels, 1, 0, config)
    except (KeyError, ValueError, IndexError) as exc:
        raise UnsupportedUpscaler(f"unsupported upscale model: the weights resemble a supported model but "
                                  f"do not fit it ({exc})") from None
    raise UnsupportedUpscaler(f"unsupported upscale model architecture ({_describe(state_dict)}); supported: "
                              f"ESRGAN/Real-ESRGAN (RRDBNet, both key layouts), Real-ESRGAN compact "
                              f"(SRVGGNetCompact) and SPAN")


def build(state_dict: dict):
    """(network in eval mode, UpscalerInfo). Floating weights become float32 (old ESRGAN files are often
    half precision, which CPUs run slowly or not at all)."""
    import torch

    from . import compact, rrdbnet, span

    info = detect(state_dict)
    state_dict = {key: value.to(torch.float32) if value.is_floating_point() else value
                  for key, value in without_module_prefix(state_dict).items()}
    try:
        network = {"ESRGAN": rrdbnet, "RealESRGAN-Compact": compact, "SPAN": span}[info.architecture].build(state_dict)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shape mismatches
        detail = " ".join(str(exc).split())[:300]
        raise UnsupportedUpscaler(f"unsupported {info.architecture} variant: {detail}") from None
    return network, info
