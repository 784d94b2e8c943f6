"""Real-ESRGAN's compact network, SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3, ...).

A plain stack `body.0 .. body.N`: a 3x3 conv to num_feat channels, PReLU, then num_conv times (3x3 conv, PReLU),
then a 3x3 conv to out_channels * scale**2 channels, which pixel_shuffle turns into the upscaled image. The
network learns a residual: the nearest-neighbour upscale of the input is added at the end.

Only PReLU activations are recognised: they are the ones with weights (body.1.weight); the released models all
use them, and a file with parameter-free activations would not say which one it was trained with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CompactConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    num_conv: int = 16
    scale: int = 4


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: CompactConfig):
        super().__init__()
        self.config = config
        c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.num_feat, 3, 1, 1), nn.PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1), nn.PReLU(c.num_feat)]
        layers.append(nn.Conv2d(c.num_feat, c.out_channels * c.scale ** 2, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.config.scale)
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")


_BODY_KEY = re.compile(r"body\.(\d+)\.(weight|bias)$")


def is_compact_layout(state_dict) -> bool:
    return ("body.0.weight" in state_dict and "body.1.weight" in state_dict
            and all(_BODY_KEY.match(key) for key in state_dict))


def config_from_state_dict(state_dict: dict) -> CompactConfig:
    indices = sorted({int(_BODY_KEY.match(key).group(1)) for key in state_dict})
    if indices != list(range(len(indices))) or len(indices) % 2 == 0:
        raise ValueError(f"SRVGGNetCompact body layers are not conv/PReLU pairs plus a last conv: {indices}")
    for index in indices:
        dims = state_dict[f"body.{index}.weight"].dim()
        if dims != (4 if index % 2 == 0 else 1):
            raise ValueError(f"SRVGGNetCompact layer body.{index} has a {dims}-d weight; expected convs at even "
                             f"and PReLU at odd positions")
    first = state_dict["body.0.weight"]
    last = state_dict[f"body.{indices[-1]}.weight"]
    in_channels, num_feat = first.shape[1], first.shape[0]
    out_channels = in_channels  # the residual adds the input to the output
    scale = math.isqrt(last.shape[0] // out_channels)
    if scale * scale * out_channels != last.shape[0]:
        raise ValueError(f"SRVGGNetCompact last conv has {last.shape[0]} channels, not {out_channels} x scale^2")
    return CompactConfig(in_channels=in_channels, out_channels=out_channels, num_feat=num_feat,
                         num_conv=(len(indices) - 3) // 2, scale=scale)


def build(state_dict: dict) -> SRVGGNetCompact:
    config = config_from_state_dict(state_dict)
    with torch.device("meta"):
        network = SRVGGNetCompact(config)
    network.load_state_dict(state_dict, strict=True, assign=True)
    return network.eval()
