"""ESRGAN's RRDBNet (Wang et al. 2018) and Real-ESRGAN's pixel-unshuffle variants, from a state dict.

Parameter names are the BasicSR / Real-ESRGAN ones:

    conv_first, body.N.rdb{1,2,3}.conv{1..5}, conv_body, conv_up1 .. conv_upK, conv_hr, conv_last

Files in the original ESRGAN layout ("model.0.weight", "model.1.sub.N.RDB1.conv1.0.weight", ...) are renamed
to these by `from_esrgan_layout`. Each conv_upK doubles the size (nearest neighbour, then a conv); models with
fewer output pixels per input pixel (Real-ESRGAN x2plus, 1x models) first fold the image with
pixel_unshuffle, so their first conv sees out_channels * factor**2 channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    num_upsample: int = 2  # each doubles the size
    unshuffle: int = 1  # pixel_unshuffle factor applied first (1: none)

    @property
    def scale(self) -> int:
        return (2 ** self.num_upsample) // self.unshuffle


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2, inplace=True)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output; the result is scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for index in range(1, 6):
            width_in = num_feat + (index - 1) * num_grow_ch
            width_out = num_feat if index == 5 else num_grow_ch
            setattr(self, f"conv{index}", nn.Conv2d(width_in, width_out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for index in range(1, 5):
            features.append(_lrelu(getattr(self, f"conv{index}")(torch.cat(features, 1))))
        return x + 0.2 * self.conv5(torch.cat(features, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks with an outer residual, also scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBConfig):
        super().__init__()
        self.config = config
        c = config
        self.conv_first = nn.Conv2d(c.in_channels * c.unshuffle ** 2, c.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(c.num_feat, c.num_grow_ch) for _ in range(c.num_block)))
        self.conv_body = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        for index in range(1, c.num_upsample + 1):
            setattr(self, f"conv_up{index}", nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(c.num_feat, c.out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for index in range(1, self.config.num_upsample + 1):
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = _lrelu(getattr(self, f"conv_up{index}")(feat))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


# ---- recognising and renaming state dicts ----------------------------------------------------------------

_ESRGAN_BLOCK = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_ESRGAN_TOP = re.compile(r"model\.(\d+)\.(weight|bias)$")
_ESRGAN_BODY_CONV = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)$")


def is_esrgan_layout(state_dict) -> bool:
    return "model.0.weight" in state_dict and "model.1.sub.0.RDB1.conv1.0.weight" in state_dict


def is_basicsr_layout(state_dict) -> bool:
    return "conv_first.weight" in state_dict and "body.0.rdb1.conv1.weight" in state_dict


def from_esrgan_layout(state_dict: dict) -> dict:
    """The original ESRGAN names ("model.N...") renamed to RRDBNet's. In that layout model.1 is the residual
    trunk (its last entry the trunk's closing conv), the upsampling convs sit at model.3, model.6, ...,
    and the last two numbered convs are conv_hr and conv_last."""
    renamed: dict = {}
    top: dict[int, dict] = {}
    trunk_convs: dict[int, dict] = {}
    for key, tensor in state_dict.items():
        if found := _ESRGAN_BLOCK.match(key):
            block, rdb, conv, kind = found.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = tensor
        elif found := _ESRGAN_BODY_CONV.match(key):
            trunk_convs.setdefault(int(found.group(1)), {})[found.group(2)] = tensor
        elif found := _ESRGAN_TOP.match(key):
            top.setdefault(int(found.group(1)), {})[found.group(2)] = tensor
        else:
            raise ValueError(f"unexpected key {key!r} for an ESRGAN (RRDBNet) model")
    if len(trunk_convs) != 1 or 0 not in top:
        raise ValueError("ESRGAN layout without its trunk conv (model.1.sub.<num_block>) or first conv (model.0)")
    tails = sorted(index for index in top if index >= 2)
    if len(tails) < 2:
        raise ValueError("ESRGAN layout without its two closing convs")
    ups = tails[:-2]
    expected = [3 * (i + 1) for i in range(len(ups))] + [3 * len(ups) + 2, 3 * len(ups) + 4]
    if tails != expected:
        raise ValueError(f"ESRGAN layout with convs at model.{tails}, expected model.{expected} (an upsampler "
                         f"other than nearest+conv is not supported)")
    names = {0: "conv_first", tails[-2]: "conv_hr", tails[-1]: "conv_last"}
    names.update({index: f"conv_up{i + 1}" for i, index in enumerate(ups)})
    for index, tensors in top.items():
        for kind, tensor in tensors.items():
            renamed[f"{names[index]}.{kind}"] = tensor
    for kind, tensor in next(iter(trunk_convs.values())).items():
        renamed[f"conv_body.{kind}"] = tensor
    return renamed


def config_from_state_dict(state_dict: dict) -> RRDBConfig:
    """The hyper-parameters of an RRDBNet state dict in BasicSR names, read from the shapes."""
    first = state_dict["conv_first.weight"]
    last = state_dict["conv_last.weight"]
    num_feat, folded_in = first.shape[0], first.shape[1]
    out_channels = last.shape[0]
    blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("body.")}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"RRDBNet body blocks are not numbered 0..N-1: {sorted(blocks)}")
    num_upsample = sum(1 for key in state_dict if re.fullmatch(r"conv_up\d+\.weight", key))
    unshuffle = 1
    for factor in (2, 4):  # Real-ESRGAN x2plus folds by 2, its 1x models by 4
        if folded_in == out_channels * factor ** 2:
            unshuffle = factor
    in_channels = folded_in // unshuffle ** 2
    if 2 ** num_upsample % unshuffle or 2 ** num_upsample < unshuffle:
        raise ValueError(f"RRDBNet with {num_upsample} upsampling convs and pixel_unshuffle by {unshuffle} "
                         f"has no whole scale")
    return RRDBConfig(in_channels=in_channels, out_channels=out_channels, num_feat=num_feat,
                      num_block=len(blocks), num_grow_ch=state_dict["body.0.rdb1.conv1.weight"].shape[0],
                      num_upsample=num_upsample, unshuffle=unshuffle)


def build(state_dict: dict) -> RRDBNet:
    """An RRDBNet with the weights of a state dict in either layout (strict: every key must be used)."""
    if is_esrgan_layout(state_dict):
        state_dict = from_esrgan_layout(state_dict)
    config = config_from_state_dict(state_dict)
    with torch.device("meta"):
        network = RRDBNet(config)
    network.load_state_dict(state_dict, strict=True, assign=True)
    return network.eval()
