"""The T2I-Adapter style model: CLIP vision tokens in, a few extra text-context tokens out.

A small transformer reads the CLIP vision encoder's last hidden state with `tokens` learned style embeddings
appended; those positions, normalised and projected to the text context width, are the output. Parameter names
are the released file's (e.g. t2iadapter_style_sd14v1.pth), so it loads without renaming:

    style_embedding [1, tokens, width], ln_pre, ln_post, proj [width, context_dim],
    transformer_layes.N.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}

(transformer_layes, sic). The released model: width 1024 (CLIP ViT-L/14's), context 768 (SD1.x), 3 layers,
8 heads, 8 tokens; quick_gelu MLPs as in OpenAI CLIP.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import quick_gelu

STYLE_KEY = "style_embedding"
# The head count is not visible in the weights; the released model has 8.
STYLE_HEADS = 8


@dataclass(frozen=True)
class StyleModelConfig:
    width: int = 1024
    context_dim: int = 768
    layers: int = 3
    heads: int = STYLE_HEADS
    tokens: int = 8

    @classmethod
    def from_state_dict(cls, weights: Mapping[str, torch.Tensor]) -> StyleModelConfig:
        """The config whose parameters have these shapes; ValueError for a file that is not a style model."""
        if STYLE_KEY not in weights or "proj" not in weights:
            raise ValueError(f"not a T2I-Adapter style model: no {STYLE_KEY!r}/'proj' tensors")
        embedding, proj = weights[STYLE_KEY], weights["proj"]
        if embedding.ndim != 3 or proj.ndim != 2 or proj.shape[0] != embedding.shape[2]:
            raise ValueError(f"style model tensors of unexpected shapes: {STYLE_KEY} {tuple(embedding.shape)}, "
                             f"proj {tuple(proj.shape)}")
        blocks = {int(m[1]) for key in weights if (m := re.match(r"^transformer_layes\.(\d+)\.", key))}
        return cls(width=embedding.shape[2], context_dim=proj.shape[1], layers=len(blocks),
                   tokens=embedding.shape[1])


class _Attention(nn.Module):
    """Multi-head self-attention with fused in_proj parameters (torch's MultiheadAttention names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
                   for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    def __init__(self, config: StyleModelConfig):
        super().__init__()
        self.config = config
        self.style_embedding = nn.Parameter(torch.empty(1, config.tokens, config.width))
        self.ln_pre = nn.LayerNorm(config.width)
        self.transformer_layes = nn.Sequential(*(_Block(config.width, config.heads) for _ in range(config.layers)))
        self.ln_post = nn.LayerNorm(config.width)
        self.proj = nn.Parameter(torch.empty(config.width, config.context_dim))

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """CLIP vision last_hidden_state [B, tokens_in, width] -> style tokens [B, tokens, context_dim]."""
        if vision_tokens.shape[-1] != self.config.width:
            raise ValueError(f"the style model reads CLIP vision tokens {self.config.width} wide, got "
                             f"{vision_tokens.shape[-1]}: use the CLIP vision model it was trained with")
        style = self.style_embedding.to(vision_tokens.dtype).expand(vision_tokens.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([vision_tokens, style], dim=1))
        x = self.transformer_layes(x)
        return self.ln_post(x[:, -self.config.tokens:, :]) @ self.proj.to(x.dtype)
