"""CLIP vision transformers (ViT-L/14, ViT-L/14-336, ViT-H/14, ViT-bigG/14) with a visual projection.

Parameter names are transformers' CLIPVisionModelWithProjection names, so a file in that layout loads with
`load_state_dict(strict=True)`:

    vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
    vision_model.pre_layrnorm                      (sic: transformers' spelling)
    vision_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}
    vision_model.post_layernorm
    visual_projection.weight                       (no bias)

OpenCLIP's "visual.*" layout (also the tower inside unCLIP checkpoints) is renamed by from_openclip_state_dict.

forward(pixel_values) returns (last_hidden_state, penultimate_hidden_states, image_embeds): the encoder
output (no final norm, as transformers and ComfyUI), the output of the second-to-last block, and the class
token after post_layernorm and the projection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .clip import ACTIVATIONS, Encoder


@dataclass(frozen=True)
class CLIPVisionConfig:
    width: int
    layers: int
    heads: int
    mlp_width: int
    projection_dim: int
    activation: str = "gelu"
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of {self.heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_l(cls, image_size: int = 224) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-L/14 (SD 2.1 unCLIP-L, T2I style adapter, IP-Adapter for SD1 "vit-l"); 336: its
        336 px variant."""
        return cls(width=1024, layers=24, heads=16, mlp_width=4096, projection_dim=768, activation="quick_gelu",
                   image_size=image_size)

    @classmethod
    def vit_h(cls) -> CLIPVisionConfig:
        """OpenCLIP ViT-H/14 (SD 2.1 unCLIP-H, most IP-Adapters)."""
        return cls(width=1280, layers=32, heads=16, mlp_width=5120, projection_dim=1024)

    @classmethod
    def vit_bigg(cls) -> CLIPVisionConfig:
        """OpenCLIP ViT-bigG/14 (SDXL revision, IP-Adapter SDXL "vit-G")."""
        return cls(width=1664, layers=48, heads=16, mlp_width=8192, projection_dim=1280)


class _Embeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.width))
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        # Built with an explicit weight: the weights always come from a file (see clip._embedding).
        self.position_embedding = nn.Embedding(config.positions, config.width,
                                               _weight=torch.empty(config.positions, config.width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, patches, width]
        if patches.shape[1] + 1 != self.position_embedding.num_embeddings:
            raise ValueError(f"images of {tuple(pixels.shape[-2:])} px make {patches.shape[1]} patches; this "
                             f"model has positions for {self.position_embedding.num_embeddings - 1}")
        cls_token = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls_token, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class _VisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.encoder = Encoder(config, causal=False)  # image patches all see each other
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPVisionModel(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = _VisionTransformer(config)
        self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixel_values [B, 3, size, size], normalised. (last_hidden_state [B, tokens, width],
        penultimate_hidden_states [B, tokens, width], image_embeds [B, projection_dim])."""
        vision = self.vision_model
        x = vision.pre_layrnorm(vision.embeddings(pixel_values))
        layers = vision.encoder.layers
        penultimate = x
        for index, layer in enumerate(layers):
            x = layer(x)
            if index == len(layers) - 2:
                penultimate = x
        pooled = vision.post_layernorm(x[:, 0, :])
        return x, penultimate, self.visual_projection(pooled)


# ---- OpenCLIP checkpoint names -------------------------------------------------------------------

_OPENCLIP_KEYS = {"class_embedding": "vision_model.embeddings.class_embedding",
                  "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                  "positional_embedding": "vision_model.embeddings.position_embedding.weight",
                  "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
                  "ln_post.weight": "vision_model.post_layernorm.weight",
                  "ln_post.bias": "vision_model.post_layernorm.bias"}
_OPENCLIP_BLOCK_PREFIXES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                            "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_OPENCLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def from_openclip_state_dict(weights: Mapping[str, torch.Tensor], prefix: str = "visual."
                             ) -> dict[str, torch.Tensor]:
    """The `prefix`ed OpenCLIP visual tower of `weights` with our names: the fused attention in_proj split into
    q/k/v views and `proj` ([width, dim], applied as x @ proj) transposed into visual_projection.weight.
    Keys outside the tower are left out; an unknown key inside it is kept (strict loading reports it)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in _OPENCLIP_KEYS:
            renamed[_OPENCLIP_KEYS[key]] = tensor
        elif key == "proj":
            renamed["visual_projection.weight"] = tensor.t()
        elif match := _OPENCLIP_BLOCK.match(key):
            block, rest = f"vision_model.encoder.layers.{match[1]}.", match[2]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                    renamed[f"{block}self_attn.{part}_proj.{rest[len('attn.in_proj_'):]}"] = chunk
            else:
                theirs = next((p for p in _OPENCLIP_BLOCK_PREFIXES if rest.startswith(p)), None)
                renamed[block + (_OPENCLIP_BLOCK_PREFIXES[theirs] + rest[len(theirs):] if theirs else rest)] = tensor
        else:
            renamed[key] = tensor
    return renamed


def to_openclip_state_dict(weights: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """Our names back to OpenCLIP's (q/k/v fused again): the inverse of from_openclip_state_dict."""
    ours_to_theirs = {ours: theirs for theirs, ours in _OPENCLIP_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    block = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
    for key, tensor in weights.items():
        if key in ours_to_theirs:
            out[prefix + ours_to_theirs[key]] = tensor
        elif key == "visual_projection.weight":
            out[prefix + "proj"] = tensor.t().contiguous()
        elif match := block.match(key):
            head, rest = f"{prefix}transformer.resblocks.{match[1]}.", match[2]
            if qkv := re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                fused.setdefault(f"{head}attn.in_proj_{qkv[2]}", [None] * 3)["qkv".index(qkv[1])] = tensor
            else:
                ours = next(o for o in _OPENCLIP_BLOCK_PREFIXES.values() if rest.startswith(o))
                theirs = next(t for t, o in _OPENCLIP_BLOCK_PREFIXES.items() if o == ours)
                out[head + theirs + rest[len(ours):]] = tensor
        else:
            raise KeyError(f"no OpenCLIP name for {key!r}")
    out.update({key: torch.cat(parts, dim=0) for key, parts in fused.items()})
    return out
