"""Winograd-transformed weights on AVX-512 only where a timing (cached per CPU class) says they are faster."""

from __future__ import annotations

import json

import pytest
import torch

from comfy_serverless.models import precision
from comfy_serverless.networks import winograd_choice


@pytest.fixture()
def avx512_with_cache(monkeypatch, tmp_path):
    cache = tmp_path / precision.CACHE_FILE_NAME
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "cache_path", lambda settings=None: str(cache))
    return cache


def timings(direct_ms: float, winograd_ms: float, calls: list):
    def measure():
        calls.append(1)
        return direct_ms, winograd_ms
    return measure


@pytest.mark.parametrize("direct_ms, winograd_ms, chosen", [(30.0, 20.0, True), (30.0, 32.0, True),
                                                            (30.0, 34.0, False), (20.0, 30.0, False)])
def test_avx512_times_once_and_caches_the_answer(avx512_with_cache, monkeypatch, direct_ms, winograd_ms, chosen):
    calls: list = []
    monkeypatch.setattr(winograd_choice, "measure", timings(direct_ms, winograd_ms, calls))
    assert winograd_choice.transformed_weights_pay() is chosen
    assert winograd_choice.transformed_weights_pay() is chosen  # read back from the file, not timed again
    assert len(calls) == 1
    entries = json.loads(avx512_with_cache.read_text())[winograd_choice.CACHE_SECTION]
    assert [(entry["direct_ms"], entry["winograd_ms"]) for entry in entries.values()] == [(direct_ms, winograd_ms)]


def test_the_cache_keeps_the_precision_measurement(avx512_with_cache, monkeypatch):
    facts = precision.cpu_facts()
    precision.write_cached(str(avx512_with_cache), facts, precision.Bf16Measurement(10.0, 30.0))
    monkeypatch.setattr(winograd_choice, "measure", timings(30.0, 20.0, []))
    assert winograd_choice.transformed_weights_pay()
    assert precision.read_cached(str(avx512_with_cache), facts) == precision.Bf16Measurement(10.0, 30.0)


def test_a_broken_cache_entry_is_measured_again(avx512_with_cache, monkeypatch):
    key = f"{precision.cpu_facts().key}:AVX512"
    avx512_with_cache.write_text(json.dumps({"format": 1, winograd_choice.CACHE_SECTION: {key: {"direct_ms": "x"}}}))
    calls: list = []
    monkeypatch.setattr(winograd_choice, "measure", timings(20.0, 30.0, calls))
    assert winograd_choice.transformed_weights_pay() is False and len(calls) == 1


def test_avx2_never_times(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(winograd_choice, "measure", lambda: pytest.fail("timed although AVX2 settles it"))
    assert winograd_choice.transformed_weights_pay()


def test_the_timing_runs_both_kernels_on_this_cpu():
    direct_ms, winograd_ms = winograd_choice.measure()
    assert 0 < direct_ms < 10_000 and 0 < winograd_ms < 10_000


def test_unwritable_cache_still_answers(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "cache_path", lambda settings=None: str(blocker / precision.CACHE_FILE_NAME))
    monkeypatch.setattr(winograd_choice, "measure", timings(30.0, 20.0, []))
    assert winograd_choice.transformed_weights_pay()


@pytest.fixture()
def kernels_timed_at(avx512_with_cache, monkeypatch):
    """cpu_kernels in its default mode, deciding afresh from a timing that says Winograd took `winograd_ms`
    against 30 ms direct."""
    from comfy_serverless.networks import cpu_kernels

    caches = (cpu_kernels._mode, cpu_kernels.transformed_winograd, cpu_kernels._winograd_min_pixels)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)

    def timed_at(winograd_ms: float):
        monkeypatch.setattr(winograd_choice, "measure", timings(30.0, winograd_ms, []))
        for cache in caches:
            cache.cache_clear()
        return cpu_kernels

    yield timed_at
    for cache in caches:
        cache.cache_clear()


@pytest.mark.parametrize("winograd_ms, chosen", [(20.0, True), (40.0, False)])
def test_cpu_kernels_follow_the_timing(kernels_timed_at, winograd_ms, chosen):
    assert kernels_timed_at(winograd_ms).transformed_winograd() is chosen


@pytest.mark.parametrize("winograd_ms, floor", [(20.0, 64 * 64), (40.0, 128 * 128)])
def test_nnpack_from_64x64_where_winograd_pays(kernels_timed_at, winograd_ms, floor):
    """NNPACK's Winograd takes the VAE's 64x64 level where Winograd products beat the direct convolution (the
    capped Xeon: 512->512 at 64x64 61 ms against 91), else only from 128x128 as before."""
    cpu_kernels = kernels_timed_at(winograd_ms)
    assert cpu_kernels._winograd_min_pixels() == (floor if torch._nnpack_available() else None)


def large_timings(pairs: list, calls: list):
    def measure_large():
        calls.append(1)
        return pairs
    return measure_large


@pytest.mark.parametrize("pairs, sizes", [([(10.0, 15.0), (30.0, 45.0)], {32 * 32, 64 * 64}),  # pays at both
                                          ([(16.0, 15.0), (30.0, 45.0)], {64 * 64}),  # only at 64x64
                                          ([(10.0, 15.0), (46.0, 45.0)], {32 * 32}),  # only at 32x32
                                          ([(16.0, 15.0), (46.0, 45.0)], set())])
def test_large_tiles_at_each_size_where_they_pay(avx512_with_cache, monkeypatch, pairs, sizes):
    calls: list = []
    monkeypatch.setattr(winograd_choice, "measure_large", large_timings(pairs, calls))
    assert winograd_choice.large_tiles_sizes() == sizes
    assert winograd_choice.large_tiles_sizes() == sizes  # read back from the file, not timed again
    assert len(calls) == 1
    entries = json.loads(avx512_with_cache.read_text())[winograd_choice.LARGE_SECTION]
    assert [(entry["large_ms"], entry["other_ms"]) for entry in entries.values()] == [
        ([large for large, _ in pairs], [other for _, other in pairs])]


@pytest.mark.parametrize("entry", [{"large_ms": [1.0], "other_ms": [2.0]}, {"large_ms": "x"}, {}])
def test_a_broken_or_other_sized_large_tiles_entry_is_measured_again(avx512_with_cache, monkeypatch, entry):
    key = f"{precision.cpu_facts().key}:AVX512"
    avx512_with_cache.write_text(json.dumps({"format": 1, winograd_choice.LARGE_SECTION: {key: entry}}))
    calls: list = []
    monkeypatch.setattr(winograd_choice, "measure_large", large_timings([(10.0, 15.0), (30.0, 45.0)], calls))
    assert winograd_choice.large_tiles_sizes() == {32 * 32, 64 * 64} and len(calls) == 1


def test_the_large_tiles_timing_runs_every_kernel_on_this_cpu():
    timings = winograd_choice.measure_large()
    assert len(timings) == len(winograd_choice.LARGE_TIMED_SIZES)
    assert all(0 < large < 10_000 and 0 < other < 10_000 for large, other in timings)


def test_both_answers_share_the_cache_file(avx512_with_cache, monkeypatch):
    monkeypatch.setattr(winograd_choice, "measure", timings(30.0, 20.0, []))
    monkeypatch.setattr(winograd_choice, "measure_large", large_timings([(16.0, 15.0), (30.0, 45.0)], []))
    assert winograd_choice.transformed_weights_pay() and winograd_choice.large_tiles_sizes() == {64 * 64}
    monkeypatch.setattr(winograd_choice, "measure", lambda: pytest.fail("timed again"))
    monkeypatch.setattr(winograd_choice, "measure_large", lambda: pytest.fail("timed again"))
    assert winograd_choice.transformed_weights_pay() and winograd_choice.large_tiles_sizes() == {64 * 64}


@pytest.mark.parametrize("dtype, timed", [(torch.float32, True), (torch.bfloat16, False)])
def test_prepare_settles_the_large_tiles_answer_for_an_fp32_vae(monkeypatch, dtype, timed):
    from comfy_serverless import prepare_command
    from comfy_serverless.networks import cpu_kernels

    asked: list = []
    monkeypatch.setattr(cpu_kernels, "large_tiles_sizes", lambda: asked.append(1))
    prepare_command._settle_kernel_timings({"unet": ({}, dtype), "vae": ({}, dtype)})
    prepare_command._settle_kernel_timings({"unet": ({}, torch.float32)})  # no VAE in the file
    assert asked == ([1] if timed else [])
