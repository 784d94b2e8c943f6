"""PhotoMaker v1 ID encoder: a CLIP vision tower whose pooled class token goes through two projections, and a fuse
module that merges that image embedding into the text encoder's output at the class word's position.

Parameter names follow the released photomaker-v1.bin "id_encoder" dict:

    vision_model.*, visual_projection.weight        the CLIP ViT-L/14 tower (networks/clip_vision.py)
    visual_projection_2.weight                      a second projection (1024 -> 1280, no bias)
    fuse_module.mlp1.{layernorm,fc1,fc2}.*          MLP(2 * dim -> dim -> dim), no residual
    fuse_module.mlp2.{layernorm,fc1,fc2}.*          MLP(dim -> dim -> dim) with residual
    fuse_module.layer_norm.*

The maths, for a class-word embedding p and the ID embedding e = [proj(pooled), proj_2(pooled)]:
    h = mlp1([p, e]) + p;   h = mlp2(h) + h;   fused = layer_norm(h)
where mlp(x) = fc2(gelu(fc1(layernorm(x)))) (exact gelu, LayerNorm eps 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .clip_vision import CLIPVisionConfig, CLIPVisionModel


@dataclass(frozen=True)
class PhotoMakerConfig:
    vision: CLIPVisionConfig
    projection_2_dim: int  # 1280 in the released model

    @property
    def embed_dim(self) -> int:
        """Width of the text encoder output it fuses into (SDXL's 768 + 1280)."""
        return self.vision.projection_dim + self.projection_2_dim

    @classmethod
    def v1(cls) -> PhotoMakerConfig:
        return cls(vision=CLIPVisionConfig.vit_l(), projection_2_dim=1280)


class FuseMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class FuseModule(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = FuseMLP(2 * embed_dim, embed_dim, embed_dim, residual=False)
        self.mlp2 = FuseMLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """[N, dim] class-word embeddings and [N, dim] ID embeddings -> [N, dim] fused embeddings."""
        hidden = self.mlp1(torch.cat([prompt_embeds, id_embeds], dim=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(hidden))

    def forward(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor, class_tokens_mask: torch.Tensor
                ) -> torch.Tensor:
        """prompt_embeds [B, tokens, dim]; id_embeds [B, images, dim]; class_tokens_mask [B, tokens] bool. The
        k-th marked token of a prompt fuses with its k-th image; other tokens are returned unchanged."""
        id_embeds = id_embeds.to(prompt_embeds.dtype)
        counts = class_tokens_mask.sum(dim=1)
        if int(counts.max()) > id_embeds.shape[1]:
            raise ValueError(f"{int(counts.max())} class tokens marked but only {id_embeds.shape[1]} ID images")
        use = torch.arange(id_embeds.shape[1], device=counts.device)[None, :] < counts[:, None]
        out = prompt_embeds.clone()
        out[class_tokens_mask] = self.fuse(prompt_embeds[class_tokens_mask], id_embeds[use]).to(out.dtype)
        return out


class PhotoMakerIDEncoder(CLIPVisionModel):
    def __init__(self, config: PhotoMakerConfig):
        super().__init__(config.vision)
        self.photomaker_config = config
        self.visual_projection_2 = nn.Linear(config.vision.width, config.projection_2_dim, bias=False)
        self.fuse_module = FuseModule(config.embed_dim)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The class token after post_layernorm (before either projection): [B, width]."""
        vision = self.vision_model
        x = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers:
            x = layer(x)
        return vision.post_layernorm(x[:, 0, :])

    def id_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, size, size] normalised pixels -> [B, embed_dim] ID embeddings."""
        pooled = self.pooled(pixel_values)
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor,  # type: ignore[override]
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """id_pixel_values [B, images, 3, size, size]; prompt_embeds [B, tokens, dim]; class_tokens_mask
        [B, tokens] -> prompt_embeds with the marked tokens fused with the images' ID embeddings."""
        batch, images = id_pixel_values.shape[:2]
        pixels = id_pixel_values.reshape(batch * images, *id_pixel_values.shape[2:])
        embeds = self.id_embeds(pixels.to(self.visual_projection.weight.dtype)).view(batch, images, -1)
        return self.fuse_module(prompt_embeds, embeds, class_tokens_mask)
