"""Build models without paying for random initialisation.

A normal ``nn.Module`` constructor fills every weight with random numbers (seconds for
a full UNet on CPU) only for us to overwrite them. Instead we construct on the ``meta``
device (shapes only, no memory) and then ``load_state_dict(..., assign=True)`` so the
parameters *are* the given tensors, e.g. memory-mapped safetensors, with no copy unless
a dtype conversion is asked for.

Typical use::

    unet = build_from_state_dict(lambda: UNetModel(UNetConfig.sd15()),
                                 strip_prefix(checkpoint, "model.diffusion_model."),
                                 dtype=torch.bfloat16)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from .cpu_kernels import use_fast_kernels

ModelT = TypeVar("ModelT", bound=nn.Module)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def build_on_meta(build_model: Callable[[], ModelT]) -> ModelT:
    """Run a model constructor with every tensor on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_model()


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed (tensors are not copied)."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_weights(
    model: ModelT, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> ModelT:
    """Make ``model``'s parameters the tensors of ``state_dict`` (strict key match) and set eval mode.

    Floating-point tensors are converted only when ``dtype`` is given and differs from the
    stored dtype; otherwise the very same tensor objects' storage is used.
    """
    if dtype is not None:
        state_dict = {
            key: value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
            for key, value in state_dict.items()
        }
    # Inference only: no autograd bookkeeping on the assigned tensors.
    model.requires_grad_(False)
    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if leftover:
        raise ValueError(f"tensors still on the meta device after loading: {leftover[:5]}")
    return use_fast_kernels(model).eval()


def build_from_state_dict(
    build_model: Callable[[], ModelT], state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> ModelT:
    """Construct on meta, then load ``state_dict`` into it by assignment (see ``load_weights``)."""
    return load_weights(build_on_meta(build_model), state_dict, dtype)


_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


def random_state_dict(
    build_model: Callable[[], nn.Module],
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    std: float = 0.02,
    affine_std: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of the model ``build_model`` makes, created directly.

    The model is only built on meta to learn names and shapes. Conv/linear weights are
    normal(0, ``std``); biases are 0 and norm scales 1, plus normal(0, ``affine_std``)
    noise when ``affine_std`` > 0 (tests use that so biases and norms are exercised).
    Values are drawn in float32 then cast, so a seed gives the same weights in any dtype.
    """
    model = build_on_meta(build_model)
    weights: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            is_norm_scale = isinstance(module, _NORM_TYPES) and param_name == "weight"
            is_bias = param_name == "bias"
            if is_norm_scale or is_bias:
                tensor = torch.full(param.shape, 1.0 if is_norm_scale else 0.0, dtype=torch.float32)
                if affine_std > 0:
                    tensor.add_(torch.empty(param.shape).normal_(0.0, affine_std, generator=generator))
            else:
                tensor = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            weights[key] = tensor if dtype == torch.float32 else tensor.to(dtype)
    return weights
