"""Random-weight CLIP vision and style model files, for tests (tiny) and benchmarks (real sizes).

    make_test_clip_vision(path)                    tiny, transformers' layout
    make_test_clip_vision(path, layout="openclip") tiny, OpenCLIP's "visual.*" layout
    make_test_style_model(path, width=..., context_dim=...)

Tiny files record their activation and head count in the safetensors metadata (the shapes do not show them).
"""

from __future__ import annotations

import os

import torch

from ..networks.build import random_state_dict
from ..networks.clip_vision import CLIPVisionConfig, CLIPVisionModel, to_openclip_state_dict
from ..networks.style_model import StyleAdapter, StyleModelConfig
from .clip_vision import ACTIVATION_METADATA_KEY, HEADS_METADATA_KEY, OPENCLIP_PREFIX

WEIGHT_STD = 0.02
AFFINE_STD = 0.02


def tiny_clip_vision_config(activation: str = "quick_gelu", width: int = 64, projection_dim: int = 32
                            ) -> CLIPVisionConfig:
    """Three blocks, 32 px images in 8 px patches (16 patches + the class token)."""
    return CLIPVisionConfig(width=width, layers=3, heads=4, mlp_width=2 * width, projection_dim=projection_dim,
                            activation=activation, image_size=32, patch_size=8)


def random_clip_vision_weights(config: CLIPVisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in our (transformers') names; embeddings get a larger spread so the class token matters."""
    generator = torch.Generator().manual_seed(seed)
    weights = random_state_dict(lambda: CLIPVisionModel(config), generator=generator, std=WEIGHT_STD,
                                affine_std=AFFINE_STD)
    for key in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight"):
        weights[key] = torch.randn(weights[key].shape, generator=generator) * 0.5
    return weights


def make_test_clip_vision(path: str | os.PathLike, config: CLIPVisionConfig | None = None, layout: str = "hf",
                          seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Writes a random CLIP vision file and returns its weights in our names (float32)."""
    from safetensors.torch import save_file

    config = config or tiny_clip_vision_config()
    weights = random_clip_vision_weights(config, seed)
    if layout == "openclip":
        stored = to_openclip_state_dict(weights, OPENCLIP_PREFIX)
    elif layout == "hf":
        stored = dict(weights)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected 'hf' or 'openclip'")
    stored = {key: value.to(dtype).contiguous() for key, value in stored.items()}
    metadata = {ACTIVATION_METADATA_KEY: config.activation, HEADS_METADATA_KEY: str(config.heads)}
    save_file(stored, os.fspath(path), metadata=metadata)
    return weights


def make_test_style_model(path: str | os.PathLike, config: StyleModelConfig | None = None, seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """A random T2I-Adapter style model (safetensors, or a torch pickle for a .pth/.pt/.bin path)."""
    config = config or StyleModelConfig(width=64, context_dim=32, layers=2, tokens=4)
    generator = torch.Generator().manual_seed(seed)
    weights = random_state_dict(lambda: StyleAdapter(config), generator=generator, std=WEIGHT_STD,
                                affine_std=AFFINE_STD)
    # The released model's scale: embeddings and projection ~ width**-0.5.
    scale = config.width ** -0.5
    weights["style_embedding"] = torch.randn(weights["style_embedding"].shape, generator=generator) * scale
    weights["proj"] = torch.randn(weights["proj"].shape, generator=generator) * scale
    if os.fspath(path).lower().endswith((".pth", ".pt", ".bin", ".ckpt")):
        torch.save(weights, path)
    else:
        from safetensors.torch import save_file

        save_file(weights, os.fspath(path))
    return weights
