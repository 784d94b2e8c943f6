"""Building blocks shared by the Stable Diffusion UNets (SD 1.x, SD 2.x, SDXL).

Attribute names follow the original LDM checkpoints so that a state dict loads
without any key renaming (see unet.py for the overall layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .projection_memo import context_projections


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of shape [N, dim]: cosines first, then sines (LDM order).

    Computed in float32 whatever the model dtype; callers cast the result.
    """
    half = dim // 2
    # Same operation order as the reference implementations, so float32 rounding matches too.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with the 32 groups every SD model uses; runs in the input's dtype (bf16 included)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(32, num_channels, eps=eps)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is passed."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # A Sequential (not a bare Linear) because checkpoints name it to_out.0.
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                value: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            return self.to_out(self.attend(self.to_q(x), self.to_k(x), self.to_v(x if value is None else value)))
        key, projected_value = context_projections(self, context, context if value is None else value)
        return self.to_out(self.attend(self.to_q(x), key, projected_value))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head attention over projected q [B, T, heads*dim_head], k and v [B, S, heads*dim_head]."""
        batch, tokens, _ = q.shape
        q = q.view(batch, tokens, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head)


class GEGLU(nn.Module):
    """Linear projection to twice the width; one half gates the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        # Index 1 is the (inference-time no-op) dropout slot; checkpoints name the output layer net.2.
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, then GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
        if transformer_options and (transformer_options.get("patches") or transformer_options.get("patches_replace")):
            from .attention_patches import patched_transformer_block

            return patched_transformer_block(self, x, context, transformer_options)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with a residual around it.

    SD 1.x projects in and out with 1x1 convolutions; SD 2.x and SDXL use linear
    layers applied after flattening (``use_linear``). Both give the same math, only
    the stored weight shapes differ.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner_dim = heads * dim_head
        self.inner_dim = inner_dim
        self.use_linear = use_linear
        self.norm = GroupNorm32(channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        if self.use_linear:
            h = self.proj_in(h)
        for index, block in enumerate(self.transformer_blocks):
            if transformer_options is not None:
                transformer_options["block_index"] = index
            h = block(h, context, transformer_options)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.view(batch, height, width, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is the dropout slot; checkpoints name the conv out_layers.3.
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution (rounding up for odd sizes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling followed by a 3x3 convolution.

    ``output_size`` lets the UNet match the skip connection exactly when the latent
    size is not a multiple of the total downsampling factor.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)
