"""Random-weight PhotoMaker v1 files, for tests.

    make_test_photomaker(path, embed_dim=...)   tiny; a .bin path is written as the released nested pickle
                                                {"id_encoder": {...}, "lora_weights": {}}, others as flat
                                                "id_encoder.*" safetensors
"""

from __future__ import annotations

import os

import torch

from ..networks.build import random_state_dict
from ..networks.photomaker import PhotoMakerConfig, PhotoMakerIDEncoder
from .clip_vision import ACTIVATION_METADATA_KEY, HEADS_METADATA_KEY
from .random_clip_vision import random_clip_vision_weights, tiny_clip_vision_config

WEIGHT_STD = 0.05
AFFINE_STD = 0.05


def tiny_photomaker_config(embed_dim: int) -> PhotoMakerConfig:
    """A tiny quick_gelu tower (as ViT-L's) whose two projections together are `embed_dim` wide."""
    first = embed_dim // 2
    return PhotoMakerConfig(vision=tiny_clip_vision_config("quick_gelu", projection_dim=first),
                            projection_2_dim=embed_dim - first)


def random_photomaker_weights(config: PhotoMakerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = random_state_dict(lambda: PhotoMakerIDEncoder(config), generator=generator, std=WEIGHT_STD,
                                affine_std=AFFINE_STD)
    weights.update(random_clip_vision_weights(config.vision, seed))
    return weights


def make_test_photomaker(path: str | os.PathLike, embed_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Writes a random PhotoMaker file and returns its ID encoder weights (float32, our names)."""
    config = tiny_photomaker_config(embed_dim)
    weights = random_photomaker_weights(config, seed)
    if os.fspath(path).lower().endswith(".bin"):
        torch.save({"id_encoder": weights, "lora_weights": {}}, path)
    else:
        from safetensors.torch import save_file

        metadata = {ACTIVATION_METADATA_KEY: config.vision.activation, HEADS_METADATA_KEY: str(config.vision.heads)}
        save_file({f"id_encoder.{key}": value.contiguous() for key, value in weights.items()}, os.fspath(path),
                  metadata=metadata)
    return weights
