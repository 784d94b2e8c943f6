"""Upscale-model networks: detection from state dicts, forward passes against an independent functional
implementation written here from the papers' descriptions, and hand-set weights with known outputs.

spandrel (the usual reference) cannot be installed next to this project's CPU torch: it imports torchvision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy_serverless.models import random_upscalers as ru
from comfy_serverless.networks import upscalers
from comfy_serverless.networks.upscalers import UnsupportedUpscaler, rrdbnet

# ---- an independent forward pass, straight from the ESRGAN-layout keys ----------------------------------

def _conv(sd, name, x):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)


def esrgan_reference(sd: dict, x: torch.Tensor, blocks: int, ups: int, unshuffle: int = 1) -> torch.Tensor:
    """RRDBNet written out from the original layout: trunk in model.1.sub, doublings at model.3, 6, ..."""
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    if unshuffle > 1:
        x = F.pixel_unshuffle(x, unshuffle)
    first = _conv(sd, "model.0", x)
    trunk = first
    for b in range(blocks):
        block_in = trunk
        for r in (1, 2, 3):
            dense = [trunk]
            for c in range(1, 5):
                dense.append(lrelu(_conv(sd, f"model.1.sub.{b}.RDB{r}.conv{c}.0", torch.cat(dense, 1))))
            trunk = trunk + 0.2 * _conv(sd, f"model.1.sub.{b}.RDB{r}.conv5.0", torch.cat(dense, 1))
        trunk = block_in + 0.2 * trunk
    feat = first + _conv(sd, f"model.1.sub.{blocks}", trunk)
    for i in range(1, ups + 1):
        feat = lrelu(_conv(sd, f"model.{3 * i}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return _conv(sd, f"model.{3 * ups + 4}", lrelu(_conv(sd, f"model.{3 * ups + 2}", feat)))


def compact_reference(sd: dict, x: torch.Tensor, scale: int) -> torch.Tensor:
    count = len({key.split(".")[1] for key in sd})
    out = x
    for i in range(0, count - 1, 2):
        out = F.prelu(_conv(sd, f"body.{i}", out), sd[f"body.{i + 1}.weight"])
    out = F.pixel_shuffle(_conv(sd, f"body.{count - 1}", out), scale)
    return out + x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)


# ---- detection ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["esrgan", "basicsr"])
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_rrdbnet_scale_and_shape_from_either_layout(layout, scale):
    network, info = upscalers.build(ru.esrgan_state_dict(scale, layout, num_feat=6, num_block=2))
    assert (info.architecture, info.scale, info.layout) == ("ESRGAN", scale, "ESRGAN" if layout == "esrgan"
                                                            else "BasicSR")
    assert (info.config.num_feat, info.config.num_block, info.config.num_grow_ch) == (6, 2, 4)
    folded = layout == "basicsr" and scale < 4
    assert info.config.unshuffle == (4 // scale if folded else 1)
    assert info.multiple_of == (4 if folded else 1)
    with torch.no_grad():
        assert network(torch.rand(2, 3, 8, 12)).shape == (2, 3, 8 * scale, 12 * scale)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_compact_hyper_parameters(scale):
    network, info = upscalers.build(ru.compact_state_dict(scale, num_feat=5, num_conv=3))
    assert (info.architecture, info.scale, info.config.num_feat, info.config.num_conv) == (
        "RealESRGAN-Compact", scale, 5, 3)
    with torch.no_grad():
        assert network(torch.rand(1, 3, 7, 5)).shape == (1, 3, 7 * scale, 5 * scale)


def test_grayscale_and_data_parallel_prefix():
    weights = ru.esrgan_state_dict(4, "esrgan", channels=1)
    network, info = upscalers.build({f"module.{key}": value for key, value in weights.items()})
    assert (info.input_channels, info.output_channels) == (1, 1)


def test_half_precision_files_run_in_float32():
    weights = {key: value.half() for key, value in ru.compact_state_dict(2).items()}
    network, _ = upscalers.build(weights)
    assert all(p.dtype == torch.float32 for p in network.parameters())


# ---- numerics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, blocks", [(4, 2), (2, 1), (1, 1), (8, 1)])
def test_rrdbnet_matches_the_functional_reference(scale, blocks):
    weights = ru.esrgan_state_dict(scale, "esrgan", num_block=blocks, spread=0.1, seed=scale)
    network, _ = upscalers.build(weights)
    x = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = network(x)
        expected = esrgan_reference(weights, x, blocks, {1: 0, 2: 1, 4: 2, 8: 3}[scale])
    assert ours.abs().max() > 0.05  # not a degenerate network
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 1])
def test_pixel_unshuffle_variants_match_the_functional_reference(scale):
    basicsr = ru.esrgan_state_dict(scale, "basicsr", spread=0.1, seed=7)
    config = ru.rrdb_config(scale, "basicsr")
    network, _ = upscalers.build(basicsr)
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        expected = esrgan_reference(ru.to_esrgan_layout(basicsr, config), x, 1, 2, unshuffle=4 // scale)
        torch.testing.assert_close(network(x), expected, rtol=0, atol=1e-5)


def test_both_layouts_load_into_the_same_network():
    basicsr = ru.esrgan_state_dict(4, "basicsr", seed=3, spread=0.1)
    esrgan = ru.to_esrgan_layout(basicsr, ru.rrdb_config(4))
    x = torch.rand(1, 3, 5, 7)
    with torch.no_grad():
        assert torch.equal(upscalers.build(basicsr)[0](x), upscalers.build(esrgan)[0](x))


def test_compact_matches_the_functional_reference():
    weights = ru.compact_state_dict(4, num_conv=3, spread=0.2, seed=5)
    network, _ = upscalers.build(weights)
    x = torch.rand(2, 3, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(network(x), compact_reference(weights, x, 4), rtol=0, atol=1e-5)


def _identity_kernel(out_channels: int, in_channels: int, pick=lambda o: o) -> torch.Tensor:
    kernel = torch.zeros(out_channels, in_channels, 3, 3)
    for o in range(out_channels):
        kernel[o, pick(o), 1, 1] = 1.0
    return kernel


def _hand_set_rrdb(scale: int) -> dict:
    """Pass-through convs, a zero trunk conv (the dense blocks then add nothing): the network becomes a
    nearest-neighbour upscale, after the pixel_unshuffle for the folded variants."""
    folded = features = 3 * (4 // scale) ** 2
    weights = {key: torch.zeros_like(value)
               for key, value in ru.esrgan_state_dict(scale, "basicsr", num_feat=features).items()}
    weights["conv_first.weight"] = _identity_kernel(features, folded)
    for name in ("conv_up1", "conv_up2", "conv_hr"):
        weights[f"{name}.weight"] = _identity_kernel(features, features)
    # after unshuffle by f, channel c * f * f holds pixel (f*h, f*w) of colour c
    weights["conv_last.weight"] = _identity_kernel(3, features, lambda o: o * (4 // scale) ** 2)
    return weights


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_hand_set_rrdbnet_is_a_nearest_neighbour_upscale(scale):
    network, _ = upscalers.build(_hand_set_rrdb(scale))
    x = torch.rand(1, 3, 8, 4)
    fold = 4 // scale
    sampled = x[..., ::fold, ::fold]  # the top-left pixel of each fold x fold cell
    expected = sampled.repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        assert torch.equal(network(x), expected)


def test_compact_with_zero_weights_is_a_nearest_neighbour_upscale():
    weights = {key: torch.zeros_like(value) for key, value in ru.compact_state_dict(2).items()}
    network, _ = upscalers.build(weights)
    x = torch.rand(1, 3, 3, 5)
    with torch.no_grad():
        assert torch.equal(network(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


# ---- refusals -------------------------------------------------------------------------------------------

def test_other_architectures_are_named_in_the_refusal():
    swinir = {"layers.0.residual_group.blocks.0.norm1.weight": torch.zeros(4), "conv_first.weight": torch.zeros(1)}
    with pytest.raises(UnsupportedUpscaler, match="SwinIR"):
        upscalers.detect(swinir)
    with pytest.raises(UnsupportedUpscaler, match=r"unsupported upscale model architecture \(2 tensors, "
                                                  r"e\.g\. 'foo\.weight'"):
        upscalers.detect({"foo.weight": torch.zeros(1), "bar.bias": torch.zeros(1)})


def test_a_damaged_esrgan_file_is_refused_with_the_reason():
    weights = ru.esrgan_state_dict(4, "esrgan")
    del weights["model.10.weight"], weights["model.10.bias"]  # conv_last gone: model.8 looks last
    with pytest.raises(UnsupportedUpscaler, match=r"resemble a supported model.*expected model"):
        upscalers.detect(weights)
    weights = ru.esrgan_state_dict(4, "basicsr")
    weights["body.0.rdb1.conv2.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(UnsupportedUpscaler, match="size mismatch for body.0.rdb1.conv2.weight"):
        upscalers.build(weights)


def test_scale_that_is_not_whole_is_refused():
    weights = ru.esrgan_state_dict(4, "basicsr")
    weights["conv_first.weight"] = torch.zeros(8, 48, 3, 3)  # folded by 4 ...
    del weights["conv_up2.weight"], weights["conv_up2.bias"]  # ... but doubled only once
    with pytest.raises(UnsupportedUpscaler, match="no whole scale"):
        upscalers.detect(weights)


def test_rrdb_config_rejects_unknown_scales():
    with pytest.raises(ValueError, match="scale must be"):
        ru.rrdb_config(3)
    assert rrdbnet.RRDBConfig(num_upsample=3).scale == 8


# ---- SPAN -----------------------------------------------------------------------------------------------

def _conv3xc_branches(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """The trained form: 1x1 skip plus a 1x1 -> 3x3 (unpadded, on the zero-padded input) -> 1x1 chain."""
    chain = F.conv2d(F.pad(x, (1, 1, 1, 1)), sd[f"{name}.conv.0.weight"], sd[f"{name}.conv.0.bias"])
    chain = F.conv2d(chain, sd[f"{name}.conv.1.weight"], sd[f"{name}.conv.1.bias"])
    chain = F.conv2d(chain, sd[f"{name}.conv.2.weight"], sd[f"{name}.conv.2.bias"])
    return chain + F.conv2d(x, sd[f"{name}.sk.weight"], sd[f"{name}.sk.bias"])


def span_reference(sd: dict, x: torch.Tensor, scale: int, norm: bool) -> torch.Tensor:
    if norm:
        x = (x - torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)) * 255.0
    first = _conv3xc_branches(sd, "conv_1", x)
    out, outputs = first, []
    for b in range(1, 7):
        activated = F.silu(_conv3xc_branches(sd, f"block_{b}.c1_r", out))
        third = _conv3xc_branches(sd, f"block_{b}.c3_r", F.silu(_conv3xc_branches(sd, f"block_{b}.c2_r", activated)))
        out = (third + out) * (torch.sigmoid(third) - 0.5)
        outputs.append(out)
    joined = torch.cat([first, _conv3xc_branches(sd, "conv_2", outputs[5]), outputs[0], activated], 1)
    joined = F.conv2d(joined, sd["conv_cat.weight"], sd["conv_cat.bias"])
    return F.pixel_shuffle(_conv(sd, "upsampler.0", joined), scale)


@pytest.mark.parametrize("scale, norm", [(4, True), (2, False), (1, True)])
def test_span_matches_the_branch_form(scale, norm):
    weights = ru.span_state_dict(scale, features=5, norm=norm, spread=0.2, seed=scale)
    network, info = upscalers.build(weights)
    assert (info.architecture, info.scale, info.config.feature_channels, info.config.norm) == ("SPAN", scale, 5,
                                                                                               norm)
    x = torch.rand(1, 3, 9, 6)
    with torch.no_grad():
        ours, expected = network(x), span_reference(weights, x, scale, norm)
    assert ours.shape == (1, 3, 9 * scale, 6 * scale)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)  # values reach ~100 (inputs x 255)


def test_span_ignores_a_stale_merged_kernel():
    weights = ru.span_state_dict(2, features=4, seed=1)
    stale = dict(weights, **{"conv_1.eval_conv.weight": torch.randn_like(weights["conv_1.eval_conv.weight"])})
    x = torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(upscalers.build(weights)[0](x), upscalers.build(stale)[0](x))
