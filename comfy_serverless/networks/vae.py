"""The KL autoencoder (VAE) of Stable Diffusion 1.x / 2.x / SDXL in the original LDM layout.

Parameter names equal the checkpoint keys with ``first_stage_model.`` stripped:

    encoder.conv_in, encoder.down.N.block.M, encoder.down.N.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    quant_conv, post_quant_conv,
    decoder.conv_in, decoder.mid.*, decoder.up.N.block.M, decoder.up.N.upsample.conv,
    decoder.norm_out, decoder.conv_out

Pixels are NCHW in [-1, 1]. Latents are *unscaled*: multiply by ``config.scaling_factor``
before handing them to a UNet, divide before decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fast_paths import conv_input


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    scaling_factor: float = 0.18215

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd(cls) -> VAEConfig:
        """SD 1.x and 2.x."""
        return cls()

    @classmethod
    def sdxl(cls) -> VAEConfig:
        return cls(scaling_factor=0.13025)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions.

    The checkpoint stores q/k/v/proj_out as 1x1 convolutions ([C, C, 1, 1]); we keep that
    storage and apply them as linear layers on the flattened sequence (a view, no copy).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    @staticmethod
    def _linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q = self._linear(self.q, h)[:, None]
        k = self._linear(self.k, h)[:, None]
        v = self._linear(self.v, h)[:, None]
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        h = self._linear(self.proj_out, h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom (the LDM convention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: its resnet blocks (``block``) and an optional resampler."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None, upsample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(channels, cfg.base_channels * mult))
                channels = cfg.base_channels * mult
            self.down.append(Level(blocks, downsample=Downsample(channels) if level != last_level else None))
        self.mid = MidBlock(channels)
        self.norm_out = _group_norm(channels)
        # Mean and log-variance, hence twice the latent channels.
        self.conv_out = nn.Conv2d(channels, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = cfg.base_channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels)
        # Built deepest level first (that is how channels flow) but stored so up[N] is level N.
        levels = []
        for level in reversed(range(len(cfg.channel_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, cfg.base_channels * cfg.channel_mult[level]))
                channels = cfg.base_channels * cfg.channel_mult[level]
            levels.append(Level(blocks, upsample=Upsample(channels) if level != 0 else None))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the latent Gaussian for ``pixels`` [B, 3, H, W] in [-1, 1]."""
        moments = self.quant_conv(self.encoder(conv_input(pixels.to(self.dtype), "vae"))).contiguous()  # fast_paths
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: torch.Tensor, sample_generator: torch.Generator | None = None) -> torch.Tensor:
        """Unscaled latents: the distribution's mean, or a sample when a generator is given."""
        mean, logvar = self.encode_distribution(pixels)
        if sample_generator is None:
            return mean
        noise = torch.randn(mean.shape, generator=sample_generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, 8H, 8W] (roughly [-1, 1], unclamped) from unscaled latents [B, 4, H, W]."""
        return self.decoder(self.post_quant_conv(conv_input(latents.to(self.dtype), "vae"))).contiguous()  # fast_paths

    def decode_tiled(
        self, latents: torch.Tensor, tile_size: int | tuple[int, int] = 64, overlap: int = 16
    ) -> torch.Tensor:
        """``decode`` tile by tile to bound memory; sizes are in latent cells, tile_size square or (rows, cols).

        Neighbouring tiles overlap by ``overlap`` cells and are cross-faded linearly there.
        """
        factor = self.config.downscale_factor
        return run_tiled(self.decode, latents, tile_size, overlap, in_per_cell=1, out_per_cell=factor)

    def encode_distribution_tiled(
        self, pixels: torch.Tensor, tile_size: int | tuple[int, int] = 512, overlap: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_distribution`` tile by tile; sizes are in pixels (rounded down to the downscale factor),
        tile_size square or (height, width).

        Height and width must be multiples of the downscale factor (8 for SD).
        """
        factor = self.config.downscale_factor
        if pixels.shape[-2] % factor or pixels.shape[-1] % factor:
            raise ValueError(f"pixel size {tuple(pixels.shape[-2:])} is not a multiple of {factor}")
        tile_pixels = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        moments = run_tiled(
            lambda tile: torch.cat(self.encode_distribution(tile), dim=1),
            pixels,
            tuple(max(1, side // factor) for side in tile_pixels),
            overlap // factor,
            in_per_cell=factor,
            out_per_cell=1,
        )
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode_tiled(
        self,
        pixels: torch.Tensor,
        tile_size: int | tuple[int, int] = 512,
        overlap: int = 64,
        sample_generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``encode`` tile by tile (see ``encode_distribution_tiled``).

        Sampling noise, if asked for, is drawn once for the whole latent so tiles show no seams.
        """
        mean, logvar = self.encode_distribution_tiled(pixels, tile_size, overlap)
        if sample_generator is None:
            return mean
        noise = torch.randn(mean.shape, generator=sample_generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` that overlap by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _edge_weights(size: int, ramp: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """1-D blend weights: 1 inside, ramping over ``ramp`` samples on the sides that have a neighbour."""
    weights = torch.ones(size, dtype=torch.float32)
    ramp = min(ramp, size)
    if ramp > 0:
        rising = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
        if fade_in:
            weights[:ramp] = torch.minimum(weights[:ramp], rising)
        if fade_out:
            weights[-ramp:] = torch.minimum(weights[-ramp:], rising.flip(0))
    return weights


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int | tuple[int, int],
    overlap: int,
    in_per_cell: int,
    out_per_cell: int,
) -> torch.Tensor:
    """Apply a resolution-changing ``fn`` to overlapping tiles of ``x`` and blend the results.

    Tiles are planned on a grid of cells (latent positions): one cell is ``in_per_cell``
    input pixels and ``out_per_cell`` output pixels. ``tile`` (square, or (rows, cols)) and ``overlap`` are
    in cells.
    Overlaps are cross-faded with linear weights that are normalised afterwards, so a
    function that commutes with cropping reproduces its untiled output exactly.
    """
    tile_rows, tile_cols = (tile, tile) if isinstance(tile, int) else tile
    if min(tile_rows, tile_cols) < 1:
        raise ValueError("tile size must be at least one cell")
    overlap = max(0, min(overlap, tile_rows - 1, tile_cols - 1))
    rows, cols = x.shape[-2] // in_per_cell, x.shape[-1] // in_per_cell
    row_starts = _tile_starts(rows, tile_rows, overlap)
    col_starts = _tile_starts(cols, tile_cols, overlap)
    ramp = overlap * out_per_cell
    out = weight_sum = None
    for top in row_starts:
        bottom = min(top + tile_rows, rows)
        row_weights = _edge_weights((bottom - top) * out_per_cell, ramp, top > 0, bottom < rows)
        for left in col_starts:
            right = min(left + tile_cols, cols)
            col_weights = _edge_weights((right - left) * out_per_cell, ramp, left > 0, right < cols)
            piece = fn(x[..., top * in_per_cell:bottom * in_per_cell, left * in_per_cell:right * in_per_cell])
            if out is None:
                out = torch.zeros(*piece.shape[:-2], rows * out_per_cell, cols * out_per_cell,
                                  dtype=torch.float32, device=piece.device)
                weight_sum = torch.zeros(rows * out_per_cell, cols * out_per_cell, dtype=torch.float32,
                                         device=piece.device)
            weights = (row_weights[:, None] * col_weights[None, :]).to(piece.device)
            out_rows = slice(top * out_per_cell, bottom * out_per_cell)
            out_cols = slice(left * out_per_cell, right * out_per_cell)
            out[..., out_rows, out_cols] += piece.float() * weights
            weight_sum[out_rows, out_cols] += weights
    return (out / weight_sum).to(piece.dtype)
