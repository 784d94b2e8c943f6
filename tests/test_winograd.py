"""networks/winograd.py: F(2x2, 3x3) gives a padding-1 3x3 convolution's result to fp32 rounding,
for any image size (tiles cut at the edges), batch and channel count, with or without a bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy_serverless.networks import winograd


def seeded(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("n, cin, cout, height, width", [(2, 16, 24, 32, 32), (1, 5, 7, 17, 23), (3, 8, 4, 9, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_same_as_a_direct_convolution(n, cin, cout, height, width, with_bias):
    x = seeded(n, cin, height, width, seed=1)
    weight = seeded(cout, cin, 3, 3, seed=2, scale=0.2)
    bias = seeded(cout, seed=3) if with_bias else None
    out = winograd.convolve(x, winograd.WinogradWeight(weight), bias)
    expected = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert float((out.double() - expected).norm() / expected.norm()) < 2e-6


def test_channels_last_input_and_a_transformed_weight_reused():
    weight = winograd.WinogradWeight(seeded(8, 6, 3, 3, seed=4))
    for seed in (5, 6):
        x = seeded(1, 6, 12, 12, seed=seed).contiguous(memory_format=torch.channels_last)
        expected = F.conv2d(x.double(), seeded(8, 6, 3, 3, seed=4).double(), padding=1)
        out = winograd.convolve(x, weight, None).double()
        assert float((out - expected).norm() / expected.norm()) < 2e-6


def test_the_transformed_weight_size():
    weight = seeded(10, 12, 3, 3)
    transformed = winograd.WinogradWeight(weight)
    assert transformed.transformed.shape == (16, 10, 12)
    assert transformed.nbytes == pytest.approx(winograd.SIZE_FACTOR * weight.numel() * 4)


@pytest.mark.parametrize("tile", [winograd.TILE, winograd.LARGE_TILE])
@pytest.mark.parametrize("cout, cin", [(64, 48), (320, 320), (5, 3)])
def test_the_weight_view_and_contiguous_taps_transform_to_the_same_bits(tile, cout, cin):
    """Weights are transformed from the weight's transposed view (no copy), fp16-held taps from contiguous fp32
    taps (cpu_kernels): both must give the bits a layer packed at its first call computes with."""
    weight = seeded(cout, cin, 3, 3, seed=7, scale=0.1).half().float()
    view = winograd.taps(weight)
    assert not view.is_contiguous()
    assert torch.equal(winograd.transform(view, tile=tile), winograd.transform(view.contiguous(), tile=tile))


@pytest.mark.parametrize("n, cin, cout, height, width", [(2, 16, 24, 32, 32), (1, 5, 7, 17, 23), (3, 8, 4, 9, 6),
                                                         (1, 3, 2, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_large_tiles_same_as_a_direct_convolution(n, cin, cout, height, width, with_bias):
    """F(4x4, 3x3), the weight transformed at the call: sizes that are no multiple of 4 cut the last tiles."""
    x = seeded(n, cin, height, width, seed=1)
    weight = seeded(cout, cin, 3, 3, seed=2, scale=0.2)
    bias = seeded(cout, seed=3) if with_bias else None
    out = winograd.convolve_large(x, weight, bias)
    expected = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert float((out.double() - expected).norm() / expected.norm()) < 5e-6


@pytest.mark.parametrize("strip_bytes", [1, 36 * 4 * 6 * 4 * 2])  # one tile row per strip; two rows
def test_large_tiles_in_strips_give_the_same_result(monkeypatch, strip_bytes):
    x = seeded(2, 6, 21, 13, seed=4).contiguous(memory_format=torch.channels_last)
    weight = seeded(5, 6, 3, 3, seed=5, scale=0.2)
    whole = winograd.convolve_large(x, weight, None)
    monkeypatch.setattr(winograd, "STRIP_BYTES", strip_bytes)
    strips = winograd.convolve_large(x, weight, None)  # other matrix sizes: the GEMMs may round differently
    assert float((strips - whole).norm() / whole.norm()) < 1e-6
    expected = F.conv2d(x.double(), weight.double(), padding=1)
    assert float((strips.double() - expected).norm() / expected.norm()) < 5e-6
