"""Tiny random-weight GLIGEN text-box files for tests, matching the tiny SD 1.5 UNet of random_checkpoints.py
(one gated self-attention fuser per transformer block, keyed as the released files key them)."""

from __future__ import annotations

import os

import torch

from ..networks.attention import BasicTransformerBlock
from ..networks.build import build_on_meta, random_state_dict
from ..networks.gligen import GatedSelfAttention, PositionNet
from ..networks.unet import UNetModel
from .random_checkpoints import tiny_unet_config

# Gate values of the random files: tanh(0.5) ~ 0.46, so the boxes clearly change a tiny model's output.
RANDOM_GATE = 0.5


def transformer_block_names(family: str = "sd15") -> list[tuple[str, int]]:
    """(module name, width) of each transformer block of the tiny UNet, in the order the UNet runs them."""
    unet = build_on_meta(lambda: UNetModel(tiny_unet_config(family)))
    return [(name, module.attn1.to_q.in_features) for name, module in unet.named_modules()
            if isinstance(module, BasicTransformerBlock)]


def random_gligen_weights(family: str = "sd15", text_dim: int | None = None, seed: int = 0, std: float = 0.1,
                          hidden: int = 16) -> dict[str, torch.Tensor]:
    config = tiny_unet_config(family)
    text_dim = text_dim or config.context_dim
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, width in transformer_block_names(family):
        fuser = random_state_dict(lambda: GatedSelfAttention(width, text_dim, 1, width), generator=generator,
                                  std=std, affine_std=std)
        fuser["alpha_attn"] = torch.tensor(RANDOM_GATE)
        fuser["alpha_dense"] = torch.tensor(RANDOM_GATE)
        weights.update({f"{name}.fuser.{key}": value for key, value in fuser.items()})
    position = random_state_dict(lambda: PositionNet(text_dim, text_dim, hidden), generator=generator, std=std,
                                 affine_std=std)
    for key in ("null_positive_feature", "null_position_feature"):
        position[key] = torch.empty(position[key].shape).normal_(0.0, std, generator=generator)
    weights.update({f"position_net.{key}": value for key, value in position.items()})
    return weights


def make_test_gligen(out_path: str | os.PathLike, family: str = "sd15", seed: int = 0) -> dict[str, torch.Tensor]:
    """Writes a tiny GLIGEN (.safetensors, or torch.save by suffix) and returns its tensors."""
    weights = {key: value.contiguous() for key, value in random_gligen_weights(family, seed=seed).items()}
    if str(out_path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(weights, str(out_path))
    else:
        torch.save(weights, str(out_path))
    return weights
