"""Whether the UNet's fp32 3x3 convolutions keep Winograd-transformed weights (winograd.py) on this CPU.

Where torch runs AVX2 code they always do (1.3-1.5x faster than oneDNN's direct convolution, winograd.py). With
AVX-512 the answer follows the microarchitecture, not the instruction set: on the project's AMD EPYC the direct
convolution was 1.5x faster (2x320->320 at 32x32: 7.3 vs 10.7 ms), while an Intel Xeon (model 207) capped at
AVX-512 + VNNI, a stand-in for the many cloud CPUs with AVX-512 but no bf16, ran the UNet's shapes 1.35-2.2x faster
as Winograd products (2x640->640 at 16x16: 18.7 vs 11.1 ms; 2x1280->1280 at 16x16: 75 vs 35 ms; 2026-12-02).
So there both are timed once, on two of the UNet's shapes (Winograd unless clearly slower: MAX_TIME_RATIO), and
the answer is cached per CPU class beside the catalogue snapshot (models/precision.py's file); `comfy-serverless
prepare` settles it at build time, since it runs a UNet step. Only fp32 networks ask (bf16 is never transformed).

large_tiles_sizes answers a second question the same way: at which image sizes F(4x4) Winograd (winograd.py's
convolve_large) beats both NNPACK and oneDNN's direct convolution, timed on the VAE decoder's 32x32 and 64x64
levels, each answer holding from its size up to the next one timed. It follows MKL's instruction set, which
torch's capability does not show: on the Xeon, 1.5x faster than NNPACK with AVX-512; with MKL capped at AVX2 clearly
faster at 32x32 (18 against 31-34 ms) and within 5-10 % at 64x64, where the drift of the machine decides it
(2026-12-02). An answer per size, not a floor from which it wins at every size: with a floor, a lost 64x64
also gave up the 32x32 level's clear gain.
"""

from __future__ import annotations

import logging
import time

import torch

from . import winograd

log = logging.getLogger(__name__)

CACHE_SECTION = "winograd"
# Winograd is kept unless it takes more than this multiple of the direct convolutions' time. Measured spread on the
# capped Xeon (2026-12-02, 14 fresh processes): 0.64-1.00, so the earlier 0.9 (asked for because its weights take
# 16/9 the memory) flipped between builds of one CPU class, and a process whose answer differed from the prepared
# packs' refused them. The EPYC's 1.47 stays well above. The extra memory is bounded anyway (cpu_kernels'
# WINOGRAD_EXTRA_MEMORY; none for fp16-held taps).
MAX_TIME_RATIO = 1.1
TIMED_SHAPES = ((2, 320, 32), (2, 640, 16))  # batch, channels, size: the UNet's 32x32 and 16x16 levels at 256 px
_ROUNDS = 5
LARGE_SECTION = "winograd_large"
LARGE_TIMED_SIZES = (32, 64)  # 512->512 3x3 convolutions, batch 1: the VAE decoder's two smallest levels at 256 px
_LARGE_ROUNDS = 3


def _cache_key() -> str:
    from ..models import precision

    return f"{precision.cpu_facts().key}:{torch.backends.cpu.get_cpu_capability()}"


def _timed_once(section: str, read, measure, record):
    """The timings cached for this CPU class in `section` of the catalogue's cache file, read by `read` (which
    raises KeyError, TypeError or ValueError on a missing or malformed entry); else `measure()`'s, stored there as
    `record(timings)`."""
    from ..models import precision

    key, path = _cache_key(), precision.cache_path()
    try:
        return read(precision.read_cached_entry(path, section, key) or {})
    except (KeyError, TypeError, ValueError):
        timings = measure()
        precision.write_cached_entry(path, section, key, record(timings))
        return timings


def transformed_weights_pay() -> bool:
    """True where Winograd-transformed weights beat oneDNN's packed direct convolution (see module doc)."""
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return True
    direct_ms, winograd_ms = _timed_once(
        CACHE_SECTION, lambda entry: (float(entry["direct_ms"]), float(entry["winograd_ms"])), measure,
        lambda timings: {"direct_ms": timings[0], "winograd_ms": timings[1]})
    chosen = winograd_ms <= MAX_TIME_RATIO * direct_ms
    log.info("fp32 3x3 convolutions: direct %.1f ms, Winograd %.1f ms -> %s", direct_ms, winograd_ms,
             "Winograd-transformed weights" if chosen else "oneDNN packed weights")
    return chosen


def measure() -> tuple[float, float]:
    """Milliseconds of TIMED_SHAPES as oneDNN packed direct convolutions and as Winograd products (best of a few
    interleaved rounds, after one untimed call of each)."""
    generator = torch.Generator().manual_seed(0)
    calls = []
    with torch.inference_mode():
        for batch, channels, size in TIMED_SHAPES:
            x = torch.randn(batch, channels, size, size, generator=generator)
            weight = torch.randn(channels, channels, 3, 3, generator=generator) * 0.02
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
            transformed = winograd.WinogradWeight(weight)
            calls.append((
                lambda x=x, packed=packed: torch.ops.mkldnn._convolution_pointwise(
                    x, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], ""),
                lambda x=x, transformed=transformed: winograd.convolve(x, transformed, None)))
        best = [float("inf"), float("inf")]
        for round_ in range(_ROUNDS + 1):
            for variant in (0, 1):
                start = time.perf_counter()
                for call in calls:
                    call[variant]()
                if round_:  # the first round selects kernels and takes fresh pages
                    best[variant] = min(best[variant], time.perf_counter() - start)
    return best[0] * 1000, best[1] * 1000


def large_tiles_sizes() -> frozenset[int]:
    """Pixels per image (of LARGE_TIMED_SIZES) where F(4x4) Winograd (winograd.convolve_large) beat the fastest
    other kernel; each answer holds for images from that size to the next one timed (cpu_kernels). Timed once per
    CPU class like transformed_weights_pay."""
    timings = _timed_once(LARGE_SECTION, _read_large, measure_large,
                          lambda timings: {"large_ms": [large for large, _ in timings],
                                           "other_ms": [other for _, other in timings]})
    won = frozenset(size * size for size, (large_ms, other_ms) in zip(LARGE_TIMED_SIZES, timings)
                    if large_ms <= other_ms)
    log.info("fp32 3x3 convolutions over large images: F(4x4) Winograd %s ms, others %s ms -> %s",
             "/".join(f"{large:.1f}" for large, _ in timings), "/".join(f"{other:.1f}" for _, other in timings),
             "used at the " + ", ".join(f"{size}x{size}" for size in LARGE_TIMED_SIZES if size * size in won)
             + " level(s)" if won else "not used")
    return won


def _read_large(entry: dict) -> list[tuple[float, float]]:
    timings = [(float(large), float(other)) for large, other in zip(entry["large_ms"], entry["other_ms"], strict=True)]
    if len(timings) != len(LARGE_TIMED_SIZES):
        raise ValueError("timed at other sizes")
    return timings


def measure_large() -> list[tuple[float, float]]:
    """Per LARGE_TIMED_SIZES: (milliseconds of F(4x4) Winograd, of the fastest of oneDNN's direct convolution and
    NNPACK), best of a few interleaved rounds after one untimed call of each."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, 3, 3, generator=generator) * 0.02
    sizes = []
    with torch.inference_mode():
        for size in LARGE_TIMED_SIZES:
            x = torch.randn(1, 512, size, size, generator=generator)
            others = [lambda x=x: F.conv2d(x, weight, padding=1)]
            if torch._nnpack_available():
                others.append(lambda x=x: torch._nnpack_spatial_convolution(x, weight, None, [1, 1]))
            sizes.append([lambda x=x: winograd.convolve_large(x, weight, None), *others])
        best = [[float("inf")] * len(calls) for calls in sizes]
        for round_ in range(_LARGE_ROUNDS + 1):
            for calls, fastest in zip(sizes, best):
                for index, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    if round_:
                        fastest[index] = min(fastest[index], time.perf_counter() - start)
    return [(fastest[0] * 1000, min(fastest[1:]) * 1000) for fastest in best]
