"""Control-LoRA files (Stability AI's "control-lora"): a ControlNet stored as low-rank updates to the UNet it runs
with, plus the parts the UNet lacks (hint encoder, zero convs) and its own norms and biases.

Keys are ControlNet names without prefix: "<module>.up" / "<module>.down" for a low-rank update of a linear or
conv weight (weight += up.flatten(1) @ down.flatten(1)), "<param>.weight" / ".bias" for a replaced tensor, and a
"lora_controlnet" marker. As in ComfyUI the network is made when sampling starts (pre_run), from the sampled
model's UNet: its config and weights, with the file's updates on top.
"""

from __future__ import annotations

import os

import torch

from ..networks.controlnet import ControlNetConfig, ControlNetModel
from .checkpoint_files import CheckpointError, open_state_dict
from .control_objects import ControlNet
from .model_cache import file_stamp, loaded_models
from .precision import dtype_name

MARKER = "lora_controlnet"


def read_control_lora(state_dict) -> tuple[dict, dict, dict]:
    """(replaced tensors, ups, downs) of a control-LoRA file, ups/downs keyed by module name."""
    tensors, ups, downs = {}, {}, {}
    for key, value in state_dict.items():
        if key == MARKER or "__" in key:
            continue
        if key.endswith(".up"):
            ups[key[:-3]] = value
        elif key.endswith(".down"):
            downs[key[:-5]] = value
        elif key.endswith((".weight", ".bias")):
            tensors[key] = value
    if set(ups) != set(downs):
        raise CheckpointError(f"control-LoRA with unpaired up/down weights: {sorted(set(ups) ^ set(downs))[:3]}")
    if "input_hint_block.0.weight" not in tensors:
        raise CheckpointError("a control-LoRA without its hint encoder (input_hint_block)")
    return tensors, ups, downs


def hint_widths(tensors) -> tuple[int, ...]:
    indices = sorted(int(k.split(".")[1]) for k in tensors
                     if k.startswith("input_hint_block.") and k.endswith(".weight"))
    return tuple(tensors[f"input_hint_block.{i}.weight"].shape[0] for i in indices[:-1:2])


def control_lora_weights(state_dict, unet_weights, config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """The ControlNet's float32 weights: the UNet's where the names match, the file's tensors over them, then the
    low-rank updates added."""
    from ..networks.build import build_on_meta

    tensors, ups, downs = read_control_lora(state_dict)
    expected = build_on_meta(lambda: ControlNetModel(config)).state_dict()
    weights = {}
    for key, meta in expected.items():
        source = tensors.get(key, unet_weights.get(key))
        if source is None:
            raise CheckpointError(f"the control-LoRA gives no {key!r} and the model's UNet has none: is it made for "
                                  f"this model family?")
        if tuple(source.shape) != tuple(meta.shape):
            raise CheckpointError(f"control-LoRA weight {key!r} has shape {tuple(source.shape)}, this model needs "
                                  f"{tuple(meta.shape)}: is it made for this model family?")
        weights[key] = source.float()
    for module, up in ups.items():
        key = f"{module}.weight"
        if key not in weights:
            raise CheckpointError(f"the control-LoRA updates {module!r}, which this model's ControlNet lacks")
        up, down = up.float().flatten(start_dim=1), downs[module].float().flatten(start_dim=1)
        if up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != weights[key].numel():
            raise CheckpointError(f"the control-LoRA's update of {module!r} does not fit this model's weight of shape "
                                  f"{tuple(weights[key].shape)}: is it made for this model family?")
        weights[key] = weights[key] + (up @ down).reshape(weights[key].shape)
    return weights


def _diffusion_model(model):
    """The MODEL being sampled, from what pre_run is given (the MODEL itself or the sampler's denoiser)."""
    for candidate in (model, getattr(model, "diffusion_model", None), getattr(model, "model", None),
                      getattr(getattr(model, "unet_apply", None), "__self__", None)):
        if candidate is not None and hasattr(candidate, "network") and hasattr(candidate, "handle"):
            return candidate
    raise TypeError("a control-LoRA needs the MODEL being sampled in pre_run (its UNet is the ControlNet's base)")


class ControlLora(ControlNet):
    """ComfyUI's ControlLora: loaded without a model; the network is made in pre_run from the sampled UNet."""

    def __init__(self, path: str, global_average_pooling: bool = False):
        super().__init__(None, None, "", None, global_average_pooling)
        self.path = path

    def copy(self) -> ControlLora:
        return self.copy_to(ControlLora(self.path, self.global_average_pooling))

    def pre_run(self, model, percent_to_sigma):
        super().pre_run(model, percent_to_sigma)
        diffusion = _diffusion_model(model)
        unet_config = diffusion.handle.get().config
        tensors, _, _ = read_control_lora(open_state_dict(self.path))
        self.config = ControlNetConfig(unet_config, hint_channels=tensors["input_hint_block.0.weight"].shape[1],
                                       hint_block_channels=hint_widths(tensors))
        self.family = diffusion.family
        self.dtype = diffusion.dtype
        config, dtype, path = self.config, self.dtype, self.path

        def build():
            from ..networks.build import build_from_state_dict

            weights = control_lora_weights(open_state_dict(path), diffusion.network().state_dict(), config)
            return build_from_state_dict(lambda: ControlNetModel(config), weights, dtype)

        stamp = file_stamp(self.path)
        key = (stamp, "control-lora", str(dtype), diffusion.handle.key, tuple(id(p) for p in diffusion.patches))
        size = diffusion.handle.estimated_bytes // 2  # about the encoder half of the UNet
        self.handle = loaded_models().handle(
            key, f"{os.path.basename(self.path)} control-LoRA ({dtype_name(dtype)})", build, size)

    def get_models(self) -> list:
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []
