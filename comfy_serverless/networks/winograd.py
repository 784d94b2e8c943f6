"""Winograd convolution F(2x2, 3x3) and F(4x4, 3x3) from torch matrix products, with the weight transformed once.

For fp32 3x3 convolutions over 16x16 to 32x32 images on CPUs where oneDNN has only AVX2 (the UNet's levels at
256-512 px): each m x m output tile costs (m+2)^2 multiplications per input/output channel pair instead of 9 m^2,
so 2.25x (F(4)) or 1.8x (F(2)) fewer, and the products are one batched matrix product per tile position that
runs at the GEMM's full rate. Measured on the project's AMD EPYC capped at AVX2 (2 threads, 2026-12-01), against
oneDNN's direct convolution with its weight packed: 2x320->320 at 32x32 13.0 -> 6.9 ms (F(4)), 2x640->640 at
32x32 52 -> 23 ms, 2x640->640 at 16x16 12.5 -> 9.1 ms (F(2)); an SD1.5 UNet step at 256 px 1.50 -> 1.29 s. Not
used elsewhere: with AVX-512 the direct convolution is twice as fast and wins (7.3 vs 8.0 ms), torch's NNPACK
is as fast from 64x64 on, and below 16x16 the weights dominate. Transforming the weight at every call instead
of once loses the gain (10.4 ms at 2x320x32x32), so the transformed weight is kept: (m+2)^2 / 9 times the
weight's size (4x for F(4), 1.8x for F(2)); cpu_kernels bounds that memory.

Results differ from a direct convolution by fp32 rounding (F(2) ~3e-6, F(4) ~6e-5 absolute on unit-scale
outputs; fp64 reference). bf16 would lose too much in the transforms and is never transformed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

TILE_SIZES = (2, 4)  # m: output tile m x m, input tile (m + 2) x (m + 2)


@functools.cache
def _transforms(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, weight, output) transforms of F(m x m, 3x3) as matrices over flattened tiles:
    input (m+2)^2 x (m+2)^2, weight (m+2)^2 x 9, output m^2 x (m+2)^2 (Kronecker products of the 1-D ones)."""
    if m == 2:  # interpolation points 0, 1, -1, infinity
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:  # points 0, 1, -1, 2, -2, infinity
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"no Winograd transform for {m}x{m} tiles")

    def kron(matrix):
        t = torch.tensor(matrix, dtype=torch.float64)
        return torch.kron(t, t).float()

    return kron(bt), kron(g), kron(at)


class WinogradWeight:
    """A 3x3 weight [out, in, 3, 3] transformed for m x m output tiles: [(m+2)^2, out, in] fp32."""

    __slots__ = ("m", "transformed")

    def __init__(self, weight: torch.Tensor, m: int):
        out_channels, in_channels = weight.shape[:2]
        _, weight_transform, _ = _transforms(m)
        self.m = m
        flat = weight.detach().reshape(out_channels * in_channels, 9)
        self.transformed = torch.mm(weight_transform, flat.t()).view(-1, out_channels, in_channels)

    @property
    def nbytes(self) -> int:
        return self.transformed.numel() * self.transformed.element_size()

    @staticmethod
    def size_factor(m: int) -> float:
        return (m + 2) ** 2 / 9


def convolve(x: torch.Tensor, weight: WinogradWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x [N, C, H, W] fp32; the result is channels_last."""
    m = weight.m
    a = m + 2
    input_transform, _, output_transform = _transforms(m)
    n, channels, height, width = x.shape
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    padded = F.pad(x, (1, tiles_w * m + 1 - width, 1, tiles_h * m + 1 - height))
    padded = padded.contiguous(memory_format=torch.channels_last)
    s_n, s_c, s_h, s_w = padded.stride()
    # every tile's a x a window, gathered tile position first: [a*a, N * tiles * C]
    tiles = padded.as_strided((a, a, n, tiles_h, tiles_w, channels), (s_h, s_w, s_n, s_h * m, s_w * m, s_c))
    v = torch.mm(input_transform, tiles.reshape(a * a, -1)).view(a * a, n * tiles_h * tiles_w, channels)
    products = torch.bmm(v, weight.transformed.transpose(1, 2))  # [a*a, N * tiles, out]
    out_channels = products.shape[-1]
    y = torch.mm(output_transform, products.view(a * a, -1))  # [m*m, N * tiles * out]
    y = y.view(m, m, n, tiles_h, tiles_w, out_channels).permute(2, 3, 0, 4, 1, 5)
    out = y.reshape(n, tiles_h * m, tiles_w * m, out_channels)  # one copy, into NHWC
    if bias is not None:
        out += bias
    out = out.permute(0, 3, 1, 2)
    if tiles_h * m != height or tiles_w * m != width:
        out = out[:, :, :height, :width].contiguous(memory_format=torch.channels_last)
    return out
