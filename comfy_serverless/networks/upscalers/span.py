"""SPAN, the Swift Parameter-free Attention Network (Wan et al. 2024), as released for 2x/4x upscaling.

    conv_1 -> block_1 .. block_6 (SPAB) -> conv_2 -> conv_cat (1x1 over four feature maps) -> upsampler

Every 3x3 conv is a Conv3XC: trained as a 1x1 -> 3x3 -> 1x1 chain plus a 1x1 skip (sk), all linear, so at
inference it is one 3x3 conv whose kernel is their composition. Files also carry that merged kernel
(eval_conv), possibly stale; like the reference implementation, the kernel is recomposed from the branches.
Inputs are centred on the DIV2K mean and scaled to 0..255 unless the file has a `no_norm` entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)
IMAGE_RANGE = 255.0
BLOCKS = 6


@dataclass(frozen=True)
class SPANConfig:
    in_channels: int = 3
    out_channels: int = 3
    feature_channels: int = 48
    scale: int = 4
    norm: bool = True


class Conv3XC(nn.Module):
    def __init__(self, c_in: int, c_out: int, gain: int = 2):
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_in * gain, 1), nn.Conv2d(c_in * gain, c_out * gain, 3),
                                  nn.Conv2d(c_out * gain, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)  # stored in files; recomposed in merged()

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias equal to sk(x) + conv(zero-padded x)."""
        first, middle, last = self.conv
        w1, w3 = first.weight[:, :, 0, 0], last.weight[:, :, 0, 0]
        kernel = torch.einsum("oa,abyx,bi->oiyx", w3, middle.weight, w1)
        middle_bias = torch.einsum("abyx,b->a", middle.weight, first.bias) + middle.bias
        bias = w3 @ middle_bias + last.bias + self.sk.bias
        kernel = kernel + F.pad(self.sk.weight, (1, 1, 1, 1))
        return kernel, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, bias = self.merged()
        return F.conv2d(x, kernel, bias, padding=1)


class SPAB(nn.Module):
    """Three Conv3XC with SiLU between; the attention map sigmoid(out3) - 0.5 gates out3 plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.c1_r = Conv3XC(channels, channels)
        self.c2_r = Conv3XC(channels, channels)
        self.c3_r = Conv3XC(channels, channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the first conv's activated output): the released models were trained with an in-place
        SiLU, so the second value SPAN concatenates is already activated."""
        out1 = F.silu(self.c1_r(x))
        out3 = self.c3_r(F.silu(self.c2_r(out1)))
        return (out3 + x) * (torch.sigmoid(out3) - 0.5), out1


class SPAN(nn.Module):
    def __init__(self, config: SPANConfig):
        super().__init__()
        self.config = config
        c = config.feature_channels
        if not config.norm:
            self.register_buffer("no_norm", torch.zeros(1))
        self.conv_1 = Conv3XC(config.in_channels, c)
        for index in range(1, BLOCKS + 1):
            setattr(self, f"block_{index}", SPAB(c))
        self.conv_cat = nn.Conv2d(4 * c, c, 1)
        self.conv_2 = Conv3XC(c, c)
        self.upsampler = nn.Sequential(nn.Conv2d(c, config.out_channels * config.scale ** 2, 3, padding=1),
                                       nn.PixelShuffle(config.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.norm:
            x = (x - torch.tensor(RGB_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)) * IMAGE_RANGE
        first = self.conv_1(x)
        out = first
        outputs = []
        for index in range(1, BLOCKS + 1):
            out, out1 = getattr(self, f"block_{index}")(out)
            outputs.append(out)
        features = torch.cat([first, self.conv_2(outputs[5]), outputs[0], out1], 1)  # out1: block 6's
        return self.upsampler(self.conv_cat(features))


def is_span_layout(state_dict) -> bool:
    return all(key in state_dict for key in ("conv_1.sk.weight", "block_1.c1_r.sk.weight", "conv_cat.weight",
                                             "conv_2.eval_conv.weight", "upsampler.0.weight"))


def config_from_state_dict(state_dict: dict) -> SPANConfig:
    features, in_channels = state_dict["conv_1.sk.weight"].shape[:2]
    upsampled = state_dict["upsampler.0.weight"].shape[0]
    scale = math.isqrt(upsampled // in_channels)
    if scale * scale * in_channels != upsampled:
        raise ValueError(f"SPAN upsampler has {upsampled} channels, not {in_channels} x scale^2")
    if f"block_{BLOCKS}.c3_r.sk.weight" not in state_dict or f"block_{BLOCKS + 1}.c1_r.sk.weight" in state_dict:
        raise ValueError(f"SPAN with other than {BLOCKS} blocks")
    return SPANConfig(in_channels, in_channels, features, scale, "no_norm" not in state_dict)


def build(state_dict: dict) -> SPAN:
    config = config_from_state_dict(state_dict)
    with torch.device("meta"):
        network = SPAN(config)
    network.load_state_dict(state_dict, strict=True, assign=True)
    return network.eval()
