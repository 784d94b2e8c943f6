"""Tiny random-weight ControlNet and T2I-Adapter files in each layout, for tests.

ControlNets match the tiny test checkpoints of models/random_checkpoints.py (same UNet config per family), so a
tiny checkpoint and a tiny ControlNet of one family sample together.
"""

from __future__ import annotations

import os

import torch

from ..networks.build import UNET_PREFIX, random_state_dict, strip_prefix
from ..networks.controlnet import ControlNetConfig, ControlNetModel
from ..networks.t2i_adapter import AdapterConfig, T2IAdapter
from .controlnets import DIFF_MARKER, ORIGINAL_PREFIX, original_to_diffusers
from .random_checkpoints import tiny_unet_config

CONTROLNET_LAYOUTS = ("original", "original-bare", "diffusers")
# Larger than a checkpoint's 0.02: the zero convs of a trained ControlNet are far from zero, and tests want
# residuals that visibly change a tiny model's image.
CONTROLNET_STD = 0.1
TINY_HINT_CHANNELS = (8, 8, 16, 16)  # four stages: 8x down, like the real hint encoder


def tiny_controlnet_config(family: str, union_types: int = 0) -> ControlNetConfig:
    return ControlNetConfig(tiny_unet_config(family), hint_block_channels=TINY_HINT_CHANNELS, union_types=union_types)


def random_controlnet_weights(config: ControlNetConfig, seed: int = 0, std: float = CONTROLNET_STD
                              ) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return random_state_dict(lambda: ControlNetModel(config), generator=generator, std=std, affine_std=std)


def _save(weights: dict[str, torch.Tensor], out_path: str | os.PathLike) -> None:
    weights = {key: value.contiguous() for key, value in weights.items()}
    if str(out_path).endswith((".safetensors", ".sft")):
        from safetensors.torch import save_file

        save_file(weights, str(out_path))
    else:
        torch.save(weights, str(out_path))


def controlnet_file_weights(weights: dict[str, torch.Tensor], config: ControlNetConfig, layout: str
                            ) -> dict[str, torch.Tensor]:
    """Our weights under the names of `layout` (one of CONTROLNET_LAYOUTS)."""
    if layout == "original":
        return {ORIGINAL_PREFIX + key: value for key, value in weights.items()}
    if layout == "original-bare":
        return dict(weights)
    if layout == "diffusers":
        return original_to_diffusers(weights, config)
    raise ValueError(f"unknown ControlNet layout {layout!r}; expected one of {', '.join(CONTROLNET_LAYOUTS)}")


def make_test_controlnet(family: str, out_path: str | os.PathLike, layout: str = "original", seed: int = 0,
                         config: ControlNetConfig | None = None, union_types: int = 0) -> dict[str, torch.Tensor]:
    """Writes a tiny ControlNet (.safetensors, or .pth by suffix; a union one with `union_types` types); returns its
    weights in our names."""
    config = config or tiny_controlnet_config(family, union_types)
    weights = random_controlnet_weights(config, seed)
    _save(controlnet_file_weights(weights, config, layout), out_path)
    return weights


def make_test_diff_controlnet(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, seed: int = 0
                              ) -> dict[str, torch.Tensor]:
    """A diff ControlNet for a checkpoint: the stored tensors are the ControlNet's minus the checkpoint UNet's
    (where the UNet has the same weight). Returns the real (summed) weights in our names."""
    from .checkpoint_files import detect_architecture, open_state_dict

    checkpoint = open_state_dict(checkpoint_path)
    unet = strip_prefix(checkpoint, UNET_PREFIX)
    config = ControlNetConfig(detect_architecture(checkpoint).unet_config, hint_block_channels=TINY_HINT_CHANNELS)
    weights = random_controlnet_weights(config, seed)
    stored = {ORIGINAL_PREFIX + key: value - unet[key].float() if key in unet else value
              for key, value in weights.items()}
    stored[DIFF_MARKER] = torch.zeros(1)
    _save(stored, out_path)
    return weights


def make_test_control_lora(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, rank: int = 2,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """A control-LoRA for a checkpoint: low-rank updates of the UNet's linear and conv weights, the hint encoder,
    zero convs and most norms/biases in full, the res blocks' embedding biases left to the UNet. Returns the
    ControlNet weights it makes with that checkpoint's UNet (float32, our names)."""
    from .checkpoint_files import detect_architecture, open_state_dict
    from .control_lora import MARKER

    checkpoint = open_state_dict(checkpoint_path)
    unet = strip_prefix(checkpoint, UNET_PREFIX)
    config = ControlNetConfig(detect_architecture(checkpoint).unet_config, hint_block_channels=TINY_HINT_CHANNELS)
    generator = torch.Generator().manual_seed(seed)
    stored: dict[str, torch.Tensor] = {MARKER: torch.zeros(1)}
    expected = {}
    for key, value in random_controlnet_weights(config, seed).items():
        base = unet.get(key)
        if base is None:
            stored[key] = expected[key] = value
        elif base.ndim >= 2:  # a linear or conv weight: a low-rank update of the UNet's
            module = key[: -len(".weight")]
            up = torch.randn(base.shape[0], rank, *([1] * (base.ndim - 2)), generator=generator) * 0.1
            down = torch.randn(rank, *base.shape[1:], generator=generator) * 0.1
            stored[f"{module}.up"], stored[f"{module}.down"] = up, down
            expected[key] = base.float() + (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        elif "emb_layers" in key:
            expected[key] = base.float()
        else:
            stored[key] = expected[key] = value
    _save(stored, out_path)
    return expected


def tiny_adapter_config(kind: str = "full", xl: bool = False, in_channels: int = 3) -> AdapterConfig:
    """Small widths (multiples of 32, so a UNet of these widths has its GroupNorms); the level structure (four
    levels, as the SD UNets expect) is the real one."""
    if kind == "light":
        return AdapterConfig("light", in_channels=in_channels, channels=(32, 64, 64, 64), res_blocks=2)
    return AdapterConfig("full", in_channels=in_channels, channels=(32, 64, 64, 64), res_blocks=2, xl=xl,
                         kernel_size=1)


def _adapter_to_diffusers(weights: dict[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[0] == "conv_in":
            name = "adapter." + key
        elif config.kind == "light":
            level = parts[1]
            name = (f"adapter.body.{level}.resnets.{parts[3]}." + ".".join(parts[4:]) if parts[2] == "body"
                    else f"adapter.body.{level}." + ".".join(parts[2:]))
        else:
            level, block = divmod(int(parts[1]), config.res_blocks)
            rest = ".".join(parts[2:])
            name = (f"adapter.body.{level}.in_conv.{parts[3]}" if parts[2] == "in_conv"
                    else f"adapter.body.{level}.resnets.{block}.{rest}")
        out[name] = value
    return out


def make_test_t2i_adapter(out_path: str | os.PathLike, config: AdapterConfig | None = None,
                          layout: str = "original", seed: int = 0) -> dict[str, torch.Tensor]:
    """Writes a tiny T2I-Adapter in the original or diffusers layout; returns its weights in original names."""
    config = config or tiny_adapter_config()
    if config.conv_downsample and layout == "diffusers":
        raise ValueError("diffusers' adapters always downsample by pooling")
    generator = torch.Generator().manual_seed(seed)
    weights = random_state_dict(lambda: T2IAdapter(config), generator=generator, std=0.1, affine_std=0.1)
    if layout == "original":
        _save(weights, out_path)
    elif layout == "diffusers":
        _save(_adapter_to_diffusers(weights, config), out_path)
    else:
        raise ValueError(f"unknown adapter layout {layout!r}; expected original or diffusers")
    return weights
