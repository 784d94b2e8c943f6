"""Tiny upscale-model files with random weights, in the layouts real files use (for tests; nothing downloaded).

    esrgan_state_dict(scale, layout=...)   RRDBNet weights: "esrgan" (model.0.weight ...) or "basicsr"
                                           (conv_first ...; scale 2 and 1 fold the input by pixel_unshuffle
                                           like Real-ESRGAN x2plus and its 1x models)
    compact_state_dict(scale)              SRVGGNetCompact weights (body.N)
    span_state_dict(scale)                 SPAN weights (conv_1, block_1..6, conv_cat, conv_2, upsampler)
    write_model(path, state_dict, wrap=)   .pth (torch.save, optionally inside {"params_ema": ...}) or
                                           .safetensors, chosen by the suffix
"""

from __future__ import annotations

import math

import torch

from ..networks.upscalers import compact, rrdbnet, span


def _randomised(network: torch.nn.Module, seed: int, spread: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(tensor.shape, generator=generator) * spread
            for name, tensor in network.state_dict().items()}


def rrdb_config(scale: int, layout: str = "basicsr", num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 4,
                channels: int = 3) -> rrdbnet.RRDBConfig:
    """The original ESRGAN layout doubles log2(scale) times (any power of two, 1 to 8); BasicSR's always
    doubles twice and folds the input first for scales 2 and 1, as Real-ESRGAN's released models do."""
    if scale not in (1, 2, 4, 8):
        raise ValueError(f"scale must be 1, 2, 4 or 8, not {scale}")
    if layout == "esrgan" or scale == 8:
        return rrdbnet.RRDBConfig(channels, channels, num_feat, num_block, num_grow_ch, int(math.log2(scale)), 1)
    return rrdbnet.RRDBConfig(channels, channels, num_feat, num_block, num_grow_ch, 2, 4 // scale)


def esrgan_state_dict(scale: int = 4, layout: str = "basicsr", seed: int = 0, spread: float = 0.05,
                      **config) -> dict[str, torch.Tensor]:
    if layout not in ("basicsr", "esrgan"):
        raise ValueError(f"layout must be 'basicsr' or 'esrgan', not {layout!r}")
    cfg = rrdb_config(scale, layout, **config)
    with torch.device("meta"):
        network = rrdbnet.RRDBNet(cfg)
    weights = _randomised(network, seed, spread)
    return to_esrgan_layout(weights, cfg) if layout == "esrgan" else weights


def to_esrgan_layout(weights: dict[str, torch.Tensor], config: rrdbnet.RRDBConfig) -> dict[str, torch.Tensor]:
    """BasicSR names -> original ESRGAN names (model.0 first conv, model.1.sub.* trunk, then per doubling an
    upsample/conv/activation triple, then the two closing convs with an activation between)."""
    ups = config.num_upsample
    fixed = {"conv_first": "model.0", "conv_body": f"model.1.sub.{config.num_block}",
             "conv_hr": f"model.{3 * ups + 2}", "conv_last": f"model.{3 * ups + 4}"}
    fixed.update({f"conv_up{i}": f"model.{3 * i}" for i in range(1, ups + 1)})
    renamed = {}
    for name, tensor in weights.items():
        parts = name.split(".")
        if parts[0] == "body":  # body.B.rdbK.convJ.kind
            block, rdb, conv, kind = parts[1], parts[2][3:], parts[3], parts[4]
            renamed[f"model.1.sub.{block}.RDB{rdb}.{conv}.0.{kind}"] = tensor
        else:
            renamed[f"{fixed[parts[0]]}.{parts[1]}"] = tensor
    return renamed


def compact_state_dict(scale: int = 4, num_feat: int = 8, num_conv: int = 2, channels: int = 3, seed: int = 0,
                       spread: float = 0.05) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        network = compact.SRVGGNetCompact(compact.CompactConfig(channels, channels, num_feat, num_conv, scale))
    return _randomised(network, seed, spread)


def span_state_dict(scale: int = 4, features: int = 4, norm: bool = True, seed: int = 0,
                    spread: float = 0.05) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        network = span.SPAN(span.SPANConfig(3, 3, features, scale, norm))
    return _randomised(network, seed, spread)


def write_model(path, state_dict: dict[str, torch.Tensor], wrap: str | None = None) -> None:
    """Writes `state_dict` as the suffix of `path` says; `wrap` nests it under that key (.pth only), as
    BasicSR's "params_ema" files do."""
    path = str(path)
    tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    if path.endswith((".safetensors", ".sft")):
        from safetensors.torch import save_file

        save_file(tensors, path)
    else:
        torch.save({wrap: tensors} if wrap else tensors, path)
