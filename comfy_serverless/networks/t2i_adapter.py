"""T2I-Adapters: small convolutional encoders of a hint image whose features are added to the UNet's input blocks.

Parameter names follow the original (TencentARC) files:

    full     conv_in; body.N.{in_conv, block1, block2, skep, down_opt.op}    N = level * res_blocks + block
    light    body.L.{in_conv, body.K.{block1, block2}, out_conv}              L = level

The hint is pixel-unshuffled first (8x, or 16x for SDXL's full adapter), so one feature level comes per UNet level
without striding at the start. forward() returns ComfyUI's lists, popped from the end by the UNet after each
input block: SD1.x/SD2.x features land after the last res block of each level, SDXL's after the first input
block at each new resolution and the level's last one, its deepest level in "middle".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterConfig:
    kind: str  # "full" or "light"
    in_channels: int = 3  # hint channels (before unshuffling)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    res_blocks: int = 2
    kernel_size: int = 1  # full adapters: of in_conv and block2 (1 in the released SD1.x ones, 3 in others)
    conv_downsample: bool = False  # full adapters: strided conv instead of average pooling
    xl: bool = False  # SDXL layout: 16x unshuffle, downsampling only into level 2

    @property
    def unshuffle(self) -> int:
        return 16 if self.xl else 8

    @property
    def unshuffled_channels(self) -> int:
        return self.in_channels * self.unshuffle ** 2


class Downsample(nn.Module):
    """Halves the resolution: 2x2 average pooling (padded on odd sizes, as ComfyUI) or a strided 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            return self.op(x)
        return F.avg_pool2d(x, 2, stride=2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class AdapterResBlock(nn.Module):
    """[downsample] -> [in_conv to the new width] -> x + block2(relu(block1(x)))."""

    def __init__(self, in_c: int, out_c: int, down: bool, kernel_size: int, use_conv: bool):
        super().__init__()
        pad = kernel_size // 2
        self.down_opt = Downsample(in_c, use_conv) if down else None
        self.in_conv = nn.Conv2d(in_c, out_c, kernel_size, padding=pad) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class LightResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class LightLevel(nn.Module):
    """[avg-pool downsample] -> 1x1 in to a quarter width -> res blocks -> 1x1 out."""

    def __init__(self, in_c: int, out_c: int, res_blocks: int, down: bool):
        super().__init__()
        inner = out_c // 4
        self.down_opt = Downsample(in_c, use_conv=False) if down else None
        self.in_conv = nn.Conv2d(in_c, inner, 1)
        self.body = nn.Sequential(*(LightResBlock(inner) for _ in range(res_blocks)))
        self.out_conv = nn.Conv2d(inner, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.unshuffle_amount = cfg.unshuffle
        self.xl = cfg.xl
        self.input_channels = cfg.in_channels
        if cfg.kind == "light":
            self.body = nn.ModuleList(
                LightLevel(cfg.unshuffled_channels if i == 0 else cfg.channels[i - 1], width, cfg.res_blocks, i > 0)
                for i, width in enumerate(cfg.channels))
            return
        self.conv_in = nn.Conv2d(cfg.unshuffled_channels, cfg.channels[0], 3, padding=1)
        blocks = []
        for level, width in enumerate(cfg.channels):
            down = level == 2 if cfg.xl else level > 0
            for index in range(cfg.res_blocks):
                in_c = cfg.channels[max(level - 1, 0)] if index == 0 else width
                blocks.append(AdapterResBlock(in_c, width, down and index == 0, cfg.kernel_size, cfg.conv_downsample))
        self.body = nn.ModuleList(blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.body[0].block1.weight.dtype if self.config.kind == "full" else self.body[0].in_conv.weight.dtype

    def features(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """One feature map per level."""
        x = F.pixel_unshuffle(hint.to(self.dtype), self.config.unshuffle)
        if self.config.kind == "light":
            found = []
            for level in self.body:
                x = level(x)
                found.append(x)
            return found
        x = self.conv_in(x)
        found = []
        for level in range(len(self.config.channels)):
            for index in range(self.config.res_blocks):
                x = self.body[level * self.config.res_blocks + index](x)
            found.append(x)
        return found

    def forward(self, hint: torch.Tensor) -> dict[str, list]:
        found = self.features(hint)
        if not self.config.xl:
            slots: list = []
            for feature in found:  # after each level's last res block (3 input blocks per SD level)
                slots += [None, None, feature]
            return {"input": slots[::-1]}
        # SDXL input blocks: conv_in, 2 res, down, 2 res, down, 2 res: features after blocks 3, 5, 8; the
        # deepest level goes to the middle block. The tenth slot is never reached (ComfyUI's list has it too).
        slots = [None, None, None, found[0], None, found[1], None, None, found[2], None]
        return {"input": slots[::-1], "middle": [found[3]]}
