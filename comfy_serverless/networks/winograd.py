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

Large images (32x32 and up, where nothing packs: the VAE, a UNet at 512 px) take F(4x4, 3x3) instead
(convolve_large): 36 products per 4x4 output tile, 2.25 multiplications per output against F(2x2)'s 4, the
weight transformed at each call (these layers run once per image; 512->512 takes 2-5 ms of a 28 ms call) and the
tiles taken in strips of at most STRIP_BYTES so the working set stays small. Where oneDNN and MKL run AVX-512 it
beat both NNPACK and oneDNN's direct convolution at every VAE shape (Intel Xeon model 207 capped at AVX-512 +
VNNI, MKL at AVX512, batch 1, 2026-12-02, ms: 512->512 at 32x32 12.6 against NNPACK 20.6 / direct 16.5; at
64x64 27.9 / 44.8 / 59.6; 256->256 at 128x128 30.6 / 47.1 / 62.6; at 256x256 119.5 / 176.5 / 237.7), with less
error than NNPACK (3.3e-6 against 5.5e-6 relative, fp64 reference). With MKL capped at AVX2 it tied NNPACK from
64x64 (46.3 vs 46.5 ms at 512x64x64), so where it runs follows a timing (winograd_choice.large_tiles_sizes).
cpu_kernels also expands fp16-held taps into F(4x4)'s weight for images from 32x32 (convolve takes either): with
MKL capped at AVX2, a 256 px UNet step 3.31 -> 3.07 s (medians of 8, alternating in one process); capped at
AVX-512 no change beyond noise (2.04 vs 2.09 s, 12 rounds).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

TILE = 2  # output tile 2x2, input tile 4x4
TRANSFORMED_ROWS = (TILE + 2) ** 2  # one matrix per position in the 4x4 input tile
SIZE_FACTOR = TRANSFORMED_ROWS / 9  # transformed weight bytes / weight bytes
LARGE_TILE = 4  # convolve_large: output tile 4x4, input tile 6x6
LARGE_TRANSFORMED_ROWS = (LARGE_TILE + 2) ** 2
# convolve_large's transformed tiles per strip: 16-64 MB ran alike (4 MB slower); the smaller, the lower a VAE
# decode's peak memory (the strip's input rows are copied with their zero border, not the whole image)
STRIP_BYTES = 32 << 20

# 1-D transforms (input B^T, weight G, output A^T) per output tile size, from the interpolation points 0, 1, -1
# and infinity (F(2, 3)) or 0, 1, -1, 2, -2 and infinity (F(4, 3)).
_ONE_D = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


@functools.cache
def _transforms(tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, weight, output) transforms of F(tile x tile, 3x3) over flattened tiles (Kronecker products of the
    1-D ones, made in fp64): for tile 2 input 16 x 16, weight 16 x 9, output 4 x 16."""
    def kron(matrix):
        t = torch.tensor(matrix, dtype=torch.float64)
        return torch.kron(t, t).float()

    bt, g, at = _ONE_D[tile]
    return kron(bt), kron(g), kron(at)


class WinogradWeight:
    """A 3x3 weight [out, in, 3, 3] transformed for 2x2 output tiles: [16, out, in] fp32."""

    __slots__ = ("transformed",)

    def __init__(self, weight: torch.Tensor):
        out_channels, in_channels = weight.shape[:2]
        self.transformed = transform(taps(weight)).view(-1, out_channels, in_channels)

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
    """A 3x3 weight [out, in, 3, 3] as [9, out * in] (a view): what `transform` takes."""
    return weight.detach().reshape(-1, 9).t()


def transform(weight_taps: torch.Tensor, out: torch.Tensor | None = None, tile: int = TILE) -> torch.Tensor:
    """The transformed weight [16, out * in] (36 rows for tile 4) of taps [9, out * in] (into `out` if given):
    contiguous ones (cpu_kernels expands fp16-held taps at each call) or the transposed view of the weight (`taps`),
    the same bits either way. The view is not copied first: on the Xeon model 207 (2026-12-02, any ISA cap, the
    server's heap settings) the product runs as fast over it as over contiguous taps (640x1280, F(4x4): 5.7-8.1
    against 6.4-7.8 ms), while the copy took 12-16 ms; a 256 px VAE decode, which transforms each weight at each
    call, took 0.94x the time without it (median of 7 alternating pairs, AVX2 cap). An earlier timing on the AMD
    EPYC had the product over the view 3x slower (640x1280: 16 vs 5.2 ms, the copy not timed): to re-measure there."""
    _, weight_transform, _ = _transforms(tile)
    return torch.mm(weight_transform, weight_taps, out=out)


def convolve(x: torch.Tensor, weight: WinogradWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x [N, C, H, W] fp32; the result is channels_last. A weight
    transformed for tile 4 (LARGE_TRANSFORMED_ROWS rows) runs as convolve_large does."""
    if weight.transformed.shape[0] == LARGE_TRANSFORMED_ROWS:
        return _large_tiles(x, weight.transformed, bias)
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
    return _as_output(y.reshape(n, tiles_h * m, tiles_w * m, out_channels), bias, height, width)  # one copy, NHWC


def _as_output(tiled: torch.Tensor, bias: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
    """The NHWC tiles' result [N, out, height, width] (channels_last), with the bias, cut to the image."""
    if bias is not None:
        tiled += bias
    out = tiled.permute(0, 3, 1, 2)
    if out.shape[2] != height or out.shape[3] != width:
        out = out[:, :, :height, :width].contiguous(memory_format=torch.channels_last)
    return out


def convolve_large(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x [N, C, H, W] and weight [out, C, 3, 3] fp32 by F(4x4, 3x3), the
    weight transformed here; the result is channels_last."""
    out_channels, channels = weight.shape[:2]
    transformed = transform(taps(weight), tile=LARGE_TILE)
    return _large_tiles(x, transformed.view(LARGE_TRANSFORMED_ROWS, out_channels, channels), bias)


def _large_tiles(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F(4x4, 3x3) with a transformed weight [36, out, in], in strips of tile rows."""
    m, a = LARGE_TILE, LARGE_TILE + 2
    input_transform, _, output_transform = _transforms(LARGE_TILE)
    out_channels, channels = transformed.shape[1:]
    n, _, height, width = x.shape
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    strip = max(1, min(tiles_h, STRIP_BYTES // (a * a * tiles_w * max(channels, out_channels) * 4)))
    rows_nhwc = x.permute(0, 2, 3, 1)
    window = x.new_empty(strip * m + 2, tiles_w * m + 2, channels)  # one strip's input rows, zero-padded
    s_h, s_w, s_c = window.stride()
    out = x.new_empty(n, tiles_h * m, tiles_w * m, out_channels)
    for image in range(n):
        for row in range(0, tiles_h, strip):
            rows = min(strip, tiles_h - row)
            top = row * m - 1  # the input row at the window's first row
            first, last = max(top, 0), min(top + rows * m + 2, height)
            window[:first - top].zero_()
            window[last - top:].zero_()
            window[:, 0].zero_()
            window[:, width + 1:].zero_()
            window[first - top:last - top, 1:width + 1].copy_(rows_nhwc[image, first:last])
            # the strip's a x a windows, tile position first: [a*a, rows * tiles_w * C]
            tiles = window.as_strided((a, a, rows, tiles_w, channels), (s_h, s_w, s_h * m, s_w * m, s_c))
            v = torch.mm(input_transform, tiles.reshape(a * a, -1)).view(a * a, rows * tiles_w, channels)
            products = torch.bmm(v, transformed.transpose(1, 2))  # [a*a, rows * tiles_w, out]
            y = torch.mm(output_transform, products.view(a * a, -1)).view(m, m, rows, tiles_w, out_channels)
            out[image, row * m:(row + rows) * m].view(rows, m, tiles_w, m, out_channels).copy_(
                y.permute(2, 0, 3, 1, 4))
    return _as_output(out, bias, height, width)
