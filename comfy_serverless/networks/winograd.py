"""Winograd convolution F(2x2, 3x3) from torch matrix products, with the weight transformed once.

For fp32 3x3 convolutions over 16x16 to 32x32 images on CPUs where oneDNN has only AVX2 (the UNet's middle
levels at 256-512 px): each 2x2 output tile costs 16 multiplications per input/output channel pair instead of
36, and the products are 16 matrix products (one per tile position) that run at the GEMM's full rate. Measured
on the project's AMD EPYC capped at AVX2 (2 threads, 2026-12-01) against oneDNN's direct convolution with its
weight packed: 2x320->320 at 32x32 13.0 -> 9.8 ms, 2x640->640 at 32x32 52 -> 35 ms, 2x640->640 at 16x16
12.5 -> 9.1 ms, 2x1280->640 at 16x16 26 -> 18 ms; an SD1.5 UNet step (cfg batch of 2) 1.56 -> 1.42 s at
256 px, 7.7 -> 7.4 s at 512 px (where cpu_kernels' 10 % memory bound leaves part of the layers packed; 6.9 s
with 15 %). The transformed weight is 16/9 of the weight's size.

With AVX-512 it is used where a timing at the first need (or at `prepare`) says so (winograd_choice.py): on the
project's AMD EPYC the direct convolution was faster (7.3 vs 10.7 ms at 2x320x32x32), on an Intel Xeon capped at
AVX-512 + VNNI Winograd was (1.35-2.2x on the UNet's shapes). From 64x64 on torch's NNPACK is faster; below 16x16
the weights dominate. Transforming the weight at every call from the plain fp32 weight keeps almost none of the gain
(12.7 vs 13.6 ms); from contiguous fp16 taps (cpu_kernels' fp16-held weights) it costs about 0.03 s per SD1.5 step
at 256 px, all layers together. F(4x4, 3x3) (36 products per 16 outputs) was measured faster still at 32x32 (6.9 ms)
but its weight is 4x the original: per byte of memory F(2x2) saves about twice the time, and at 512 px F(4x4) under
the same memory bound gained nothing.

Results differ from a direct convolution by fp32 rounding (~3e-6 relative; fp64 reference). bf16 is never
transformed: on the AMX Xeon (2026-12-02) F(2x2) in bf16 from these torch operations had twice the direct
convolution's error (5.5e-3 vs 2.9e-3 relative) and was slower at every VAE shape (512->512 at 64x64: 32.5 vs
27.3 ms; 128->128 at 256x256: 63 vs 27 ms), its 4x-sized tile transforms bound by memory next to AMX products.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

TILE = 2  # output tile 2x2, input tile 4x4
TRANSFORMED_ROWS = (TILE + 2) ** 2  # one matrix per position in the 4x4 input tile
SIZE_FACTOR = TRANSFORMED_ROWS / 9  # transformed weight bytes / weight bytes


@functools.cache
def _transforms() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, weight, output) transforms of F(2x2, 3x3) over flattened tiles, interpolation points 0, 1, -1 and
    infinity: input 16 x 16, weight 16 x 9, output 4 x 16 (Kronecker products of the 1-D transforms)."""
    bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    g = [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]
    at = [[1, 1, 1, 0], [0, 1, -1, -1]]

    def kron(matrix):
        t = torch.tensor(matrix, dtype=torch.float64)
        return torch.kron(t, t).float()

    return kron(bt), kron(g), kron(at)


class WinogradWeight:
    """A 3x3 weight [out, in, 3, 3] transformed for 2x2 output tiles: [16, out, in] fp32."""

    __slots__ = ("transformed",)

    def __init__(self, weight: torch.Tensor):
        out_channels, in_channels = weight.shape[:2]
        self.transformed = transform(taps(weight).contiguous()).view(-1, out_channels, in_channels)

    @classmethod
    def from_transformed(cls, transformed: torch.Tensor) -> WinogradWeight:
        """One transformed before (`prepare` writes them; models/prepared_packs.py)."""
        weight = cls.__new__(cls)
        weight.transformed = transformed
        return weight

    @property
    def nbytes(self) -> int:
        return self.transformed.numel() * self.transformed.element_size()


def taps(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 weight [out, in, 3, 3] as [9, out * in] (a view): what `transform` takes, once contiguous."""
    return weight.detach().reshape(-1, 9).t()


def transform(weight_taps: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The transformed weight [16, out * in] of contiguous taps [9, out * in] (into `out` if given). The same
    matrix product whether the taps were just read (cpu_kernels expands fp16-held ones at each call) or not: the
    same bits. Over contiguous taps it runs 3x faster than over the transposed weight (640x1280: 5.2 vs 16 ms)."""
    _, weight_transform, _ = _transforms()
    return torch.mm(weight_transform, weight_taps, out=out)


def convolve(x: torch.Tensor, weight: WinogradWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x [N, C, H, W] fp32; the result is channels_last."""
    m, a = TILE, TILE + 2
    input_transform, _, output_transform = _transforms()
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
