"""T2I-Adapter files (loaded through ControlNetLoader, as in ComfyUI) and their control object.

Layouts read: the original TencentARC one (conv_in / body.N.block1 ...; light: body.L.in_conv / body.L.body.K ...)
and diffusers' (adapter.conv_in, adapter.body.L.resnets.J ...; light: adapter.body.L.in_conv ...). The config
(full or light, widths, res blocks, kernel size, SDXL) is read from the shapes; like ComfyUI, an unshuffled input
of 256 or 768 channels (1 or 3 hint channels at 16x) means the SDXL adapter.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch

from ..networks.t2i_adapter import AdapterConfig, T2IAdapter
from .checkpoint_files import CheckpointError, open_state_dict
from .control_objects import ControlBase, broadcast_image_to
from .model_cache import file_stamp, loaded_models
from .precision import dtype_name, unet_dtype

XL_UNSHUFFLED_CHANNELS = (256, 768)
LEVELS = 4  # every released adapter has one feature level per SD UNet level
_DIFFUSERS_BLOCK = re.compile(r"^adapter\.body\.(\d+)\.resnets\.(\d+)\.(.+)$")
_DIFFUSERS_LEVEL = re.compile(r"^adapter\.body\.(\d+)\.(in_conv|out_conv)\.(.+)$")


def is_t2i_adapter(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return (any(key.startswith("adapter.body.") for key in state_dict)
            or ("conv_in.weight" in state_dict and "body.0.block1.weight" in state_dict)
            or ("body.0.in_conv.weight" in state_dict and "body.0.out_conv.weight" in state_dict))


def to_original_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-layout adapter keys -> the original ones (an original file is returned as it is)."""
    if not any(key.startswith("adapter.") for key in state_dict):
        return dict(state_dict)
    light = "adapter.body.0.out_conv.weight" in state_dict
    res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("adapter.body.0.resnets.")})
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("adapter.conv_in."):
            out[key[len("adapter."):]] = tensor
        elif match := _DIFFUSERS_BLOCK.match(key):
            level, block, rest = int(match[1]), int(match[2]), match[3]
            name = f"body.{level}.body.{block}.{rest}" if light else f"body.{level * res_blocks + block}.{rest}"
            out[name] = tensor
        elif match := _DIFFUSERS_LEVEL.match(key):
            level = int(match[1])
            out[f"body.{level if light else level * res_blocks}.{match[2]}.{match[3]}"] = tensor
        else:
            raise CheckpointError(f"unexpected key {key!r} in a diffusers-layout T2I-Adapter")
    return out


def adapter_config(weights: Mapping[str, torch.Tensor]) -> AdapterConfig:
    if "body.0.out_conv.weight" in weights:
        levels = len({k.split(".")[1] for k in weights if k.startswith("body.")})
        res_blocks = len({k.split(".")[3] for k in weights if k.startswith("body.0.body.")})
        unshuffled = weights["body.0.in_conv.weight"].shape[1]
        return AdapterConfig("light", in_channels=unshuffled // 64, res_blocks=res_blocks,
                             channels=tuple(weights[f"body.{i}.out_conv.weight"].shape[0] for i in range(levels)))
    blocks = len({k.split(".")[1] for k in weights if k.startswith("body.")})
    if blocks % LEVELS:
        raise CheckpointError(f"a T2I-Adapter with {blocks} blocks, not a multiple of {LEVELS} levels")
    res_blocks = blocks // LEVELS
    unshuffled = weights["conv_in.weight"].shape[1]
    xl = unshuffled in XL_UNSHUFFLED_CHANNELS
    return AdapterConfig(
        "full", in_channels=unshuffled // (256 if xl else 64), res_blocks=res_blocks, xl=xl,
        channels=tuple(weights[f"body.{level * res_blocks}.block1.weight"].shape[0] for level in range(LEVELS)),
        kernel_size=weights["body.0.block2.weight"].shape[2],
        conv_downsample=any(k.endswith("down_opt.op.weight") for k in weights))


def _read(path: str, state_dict=None) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    weights = to_original_names(state_dict if state_dict is not None else open_state_dict(path))
    return weights, adapter_config(weights)


def _build(path: str, dtype) -> T2IAdapter:
    from ..networks.build import build_from_state_dict

    weights, config = _read(path)
    return build_from_state_dict(lambda: T2IAdapter(config), weights, dtype)


def load_t2i_adapter(path: str, state_dict=None) -> T2IAdapterControl:
    from ..networks.build import build_on_meta

    weights, config = _read(path, state_dict)
    expected = build_on_meta(lambda: T2IAdapter(config)).state_dict()
    if set(expected) != set(weights) or any(tuple(weights[k].shape) != tuple(v.shape) for k, v in expected.items()):
        odd = sorted(set(expected) ^ set(weights))[:3]
        raise CheckpointError(f"the T2I-Adapter's weights do not fit its detected layout ({odd or 'shapes'})")
    dtype = unet_dtype()
    stamp = file_stamp(path)
    size = sum(t.numel() for t in weights.values()) * torch.empty(0, dtype=dtype).element_size()
    handle = loaded_models().handle((stamp, "t2i-adapter", str(dtype)),
                                    f"{os.path.basename(path)} T2I-Adapter ({dtype_name(dtype)})",
                                    lambda: _build(path, dtype), size, family=(stamp[0], "t2i-adapter"))
    return T2IAdapterControl(handle, config)


class T2IAdapterControl(ControlBase):
    """ComfyUI's T2IAdapter control: the adapter runs once per hint (it does not see the latents), its
    features are scaled by the strength and added after the UNet's input blocks."""

    def __init__(self, handle, config: AdapterConfig):
        super().__init__()
        self.handle = handle
        self.config = config
        self.control_input = None

    def copy(self) -> T2IAdapterControl:
        return self.copy_to(T2IAdapterControl(self.handle, self.config))

    def get_models(self) -> list:
        return super().get_models() + [self.handle]

    def cleanup(self):
        super().cleanup()
        self.control_input = None

    def hint_size(self, width: int, height: int) -> tuple[int, int]:
        """The latent's pixel size rounded up to whole unshuffle cells."""
        step = self.config.unshuffle
        return math.ceil(width / step) * step, math.ceil(height / step) * step

    def get_control(self, x, sigma, cond, batched_number, transformer_options=None):
        previous = self._previous(x, sigma, cond, batched_number, transformer_options)
        if self._inactive(sigma):
            return previous
        width, height = self.hint_size(x.shape[3] * self.compression_ratio, x.shape[2] * self.compression_ratio)
        if self.cond_hint is None or tuple(self.cond_hint.shape[2:]) != (height, width):
            network = self.handle.get()
            hint = self._hint_at(width, height, x.device, torch.float32)
            if self.config.in_channels == 1 and hint.shape[1] > 1:
                hint = hint.mean(dim=1, keepdim=True)
            if hint.shape[1] != self.config.in_channels:
                raise ValueError(f"this T2I-Adapter takes hint images with {self.config.in_channels} channels, "
                                 f"got {hint.shape[1]}")
            self.cond_hint = hint
            with torch.no_grad():
                self.control_input = network(hint)
        control = {key: [None if item is None else self._to_batch(item, x.shape[0], batched_number)
                         for item in items] for key, items in self.control_input.items()}
        return self.control_merge(control, previous, output_dtype=x.dtype)

    @staticmethod
    def _to_batch(feature, batch: int, batched_number: int):
        feature = broadcast_image_to(feature, batch, batched_number)
        # The UNet adds residuals of its own batch size (ComfyUI relies on broadcasting a single hint's).
        return feature.expand(batch, *feature.shape[1:]) if feature.shape[0] == 1 else feature
