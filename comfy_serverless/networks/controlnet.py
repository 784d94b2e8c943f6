"""ControlNet: a trainable copy of the UNet's encoder half that turns a hint image into residuals for the UNet.

Parameter names equal the original ("control_model."-prefixed, prefix stripped) checkpoint keys:

    time_embed.{0,2}, label_emb.0.{0,2}  as in the UNet (label_emb: SDXL only)
    input_hint_block.{0,2,...,14}        hint encoder: convs with SiLU between, three stride-2 steps (8x down)
    input_blocks.N                       the UNet's input blocks (conv_in, ResBlocks, transformers, downsamples)
    zero_convs.N.0                       1x1 conv after input block N: that block's residual
    middle_block.{0,1,2}                 the UNet's middle block
    middle_block_out.0                   1x1 conv: the middle block's residual

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


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder half is built from it (output blocks and out channels are unused)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS

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


class ControlNetModel(nn.Module):
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
    ) -> dict[str, list[torch.Tensor]]:
        """Residuals for latents ``x`` [B, C, h, w] (UNet-scaled) and hint images [B or 1, hint_channels, 8h, 8w].

        ``timesteps`` [B] or a scalar, ``context`` [B, tokens, context_dim], ``y`` SDXL's conditioning vector.
        """
        dtype = self.dtype
        x = x.to(dtype)
        context = context.to(dtype)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.unet.model_channels).to(dtype))
        if self.config.unet.adm_in_channels is not None:
            if y is None:
                raise ValueError("this ControlNet needs the conditioning vector y (SDXL)")
            emb = emb + self.label_emb(y.to(dtype))

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
