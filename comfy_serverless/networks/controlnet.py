"""ControlNet: a trainable copy of the UNet's encoder half that turns a hint image into residuals for the UNet.

Parameter names equal the original ("control_model."-prefixed, prefix stripped) checkpoint keys:

    time_embed.{0,2}, label_emb.0.{0,2}  as in the UNet (label_emb: SDXL only)
    input_hint_block.{0,2,...,14}        hint encoder: convs with SiLU between, three stride-2 steps (8x down)
    input_blocks.N                       the UNet's input blocks (conv_in, ResBlocks, transformers, downsamples)
    zero_convs.N.0                       1x1 conv after input block N: that block's residual
    middle_block.{0,1,2}                 the UNet's middle block
    middle_block_out.0                   1x1 conv: the middle block's residual

Union ControlNets (ControlNet++, SDXL) add, as ComfyUI names them:

    control_add_embedding.linear_{1,2}   MLP over the sinusoidal embedding of the one-hot control type, added to
                                         the time embedding
    task_embedding                       one vector per control type, added to the hint's mean feature
    transformer_layes.0                  a pre-norm transformer block over that feature (one token per hint)
    spatial_ch_projs                     the block's output, projected and added to the hint features everywhere

forward() returns {"output": [one residual per input block, in input-block order], "middle": [one residual]}:
the UNet adds output[i] to the skip of input block i and middle[0] to the middle block's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Downsample, ResBlock, SpatialTransformer, timestep_embedding
from .unet import UNetBlock, UNetConfig

# Widths of the hint encoder's stages; each stage after the first halves the resolution.
HINT_BLOCK_CHANNELS = (16, 32, 96, 256)
# Union ControlNets: width of each control type's sinusoidal embedding, and attention heads of the type block.
CONTROL_TYPE_EMBED_DIM = 256
UNION_HEADS = 8


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder half is built from it (output blocks and out channels are unused)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS
    union_types: int = 0  # > 0: a union ControlNet taking that many control types

    @property
    def hint_downscale(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)


def hint_encoder(hint_channels: int, widths: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """conv, then per stage conv + strided conv to the next width, then a conv to the UNet's width; SiLU between."""
    layers: list[nn.Module] = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for width, next_width in zip(widths, widths[1:]):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(width, next_width, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> UNetBlock:
    # A UNetBlock so the weight is named zero_convs.N.0 as in checkpoints.
    return UNetBlock([nn.Conv2d(channels, channels, 1)])


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class FusedSelfAttention(nn.Module):
    """Self-attention with one fused q/k/v projection (named in_proj / out_proj, as in the files)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(channels, channels * 3)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in self.in_proj(x).chunk(3, dim=-1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class UnionTransformerBlock(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attn = FusedSelfAttention(channels, heads)
        self.ln_1 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(channels, channels * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(channels * 4, channels))
        self.ln_2 = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ControlTypeEmbedding(nn.Module):
    """MLP over the concatenated sinusoidal embeddings of a one-hot vector of the chosen control types."""

    def __init__(self, types: int, out_dim: int):
        super().__init__()
        self.types = types
        self.linear_1 = nn.Linear(CONTROL_TYPE_EMBED_DIM * types, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, control_type: list[int], dtype, device) -> torch.Tensor:
        one_hot = torch.zeros(self.types, device=device)
        one_hot[list(control_type)] = 1.0
        embedded = timestep_embedding(one_hot, CONTROL_TYPE_EMBED_DIM).to(dtype).reshape(1, -1)
        return self.linear_2(torch.nn.functional.silu(self.linear_1(embedded)))


class ControlNetModel(nn.Module):
    CALLED_PER_STEP = True  # cpu_kernels packs its weights at the first call

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        emb_dim = cfg.time_embed_dim

        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )
        self.input_hint_block = hint_encoder(config.hint_channels, config.hint_block_channels, cfg.model_channels)

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.attention_heads(channels)
            return SpatialTransformer(channels, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)

        channels = cfg.model_channels
        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(cfg.in_channels, channels, 3, padding=1)])])
        self.zero_convs = nn.ModuleList([zero_conv(channels)])
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            depth = cfg.transformer_depth[level]
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(channels, emb_dim, cfg.model_channels * mult)]
                channels = cfg.model_channels * mult
                if depth > 0:
                    layers.append(transformer(channels, depth))
                self.input_blocks.append(UNetBlock(layers))
                self.zero_convs.append(zero_conv(channels))
            if level != last_level:
                self.input_blocks.append(UNetBlock([Downsample(channels)]))
                self.zero_convs.append(zero_conv(channels))

        middle = [ResBlock(channels, emb_dim, channels)]
        if cfg.transformer_depth_middle > 0:  # without a transformer the middle is a single ResBlock
            middle += [transformer(channels, cfg.transformer_depth_middle), ResBlock(channels, emb_dim, channels)]
        self.middle_block = UNetBlock(middle)
        self.middle_block_out = zero_conv(channels)

        if config.union_types:
            width = cfg.model_channels
            self.task_embedding = nn.Parameter(torch.empty(config.union_types, width))
            self.transformer_layes = nn.Sequential(UnionTransformerBlock(width, UNION_HEADS))
            self.spatial_ch_projs = nn.Linear(width, width)
            self.control_add_embedding = ControlTypeEmbedding(config.union_types, emb_dim)

    def union_hint(self, hint: torch.Tensor, control_type: list[int]) -> torch.Tensor:
        """The hint features of a union ControlNet for one hint image of type control_type[0] (ComfyUI uses one):
        the encoded hint plus a per-channel offset from the transformer over its mean feature and type vector."""
        features = self.input_hint_block(hint)
        token = features.mean(dim=(2, 3)) + self.task_embedding[control_type[0]].to(features.dtype)
        mixed = self.transformer_layes(token.unsqueeze(1))
        return features + self.spatial_ch_projs(mixed[:, 0])[:, :, None, None]

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        control_type: list[int] | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """Residuals for latents ``x`` [B, C, h, w] (UNet-scaled) and hint images [B or 1, hint_channels, 8h, 8w].

        ``timesteps`` [B] or a scalar, ``context`` [B, tokens, context_dim], ``y`` SDXL's conditioning vector,
        ``control_type`` a union ControlNet's type indices ([] or None: "auto"; ignored by other ControlNets).
        """
        dtype = self.dtype
        x = x.to(dtype)
        context = context.to(dtype)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.unet.model_channels).to(dtype))
        guided_hint = None
        if self.config.union_types:
            control_type = list(control_type or [])
            if any(not 0 <= t < self.config.union_types for t in control_type):
                raise ValueError(f"control type {max(control_type)} is out of range: this union ControlNet knows "
                                 f"{self.config.union_types} types (a ProMax union model knows more)")
            emb = emb + self.control_add_embedding(control_type, dtype, x.device)
            if control_type:
                guided_hint = self.union_hint(hint.to(dtype), control_type)
        if self.config.unet.adm_in_channels is not None:
            if y is None:
                raise ValueError("this ControlNet needs the conditioning vector y (SDXL)")
            emb = emb + self.label_emb(y.to(dtype))

        if guided_hint is None:
            guided_hint = self.input_hint_block(hint.to(dtype))
        outputs = []
        h = x
        for index, (block, out_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided_hint
            outputs.append(out_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        return {"output": outputs, "middle": [self.middle_block_out(h, emb, context)]}
