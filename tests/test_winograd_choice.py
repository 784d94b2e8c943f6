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
