"""The default compute dtype: decided from the CPU's instruction set where that settles it, measured (once per
machine class, cached beside the catalogue snapshot) only where it does not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from comfy_serverless.models import precision
from comfy_serverless.models.precision import Bf16Measurement, CpuFacts

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma f16c

processor\t: 1
model name\t: something else
flags\t\t: fpu avx512f avx512_bf16
"""


def facts(flags: str, machine: str = "x86_64", torch_version: str = "2.13.0", mkldnn_bf16: bool = True,
          model: str = "Test CPU") -> CpuFacts:
    return CpuFacts(model, frozenset(flags.split()), machine, torch_version, mkldnn_bf16)


def test_cpuinfo_first_processor_only(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    model, flags = precision.read_cpu_flags(str(path))
    assert model == "AMD EPYC 7B13"
    assert {"avx2", "fma"} <= flags and "avx512f" not in flags
    assert precision.read_cpu_flags(str(tmp_path / "missing")) == ("unknown", frozenset())


@pytest.mark.parametrize("flags, machine, mkldnn, expected", [
    ("avx2 avx512f avx512_bf16", "x86_64", True, True),
    ("avx2 avx512f amx_tile amx_bf16", "x86_64", True, True),
    ("avx2 fma f16c", "x86_64", True, False),            # the AVX2-only EPYC: no probe, fp32
    ("avx2 avx512f avx512_bf16", "x86_64", False, False),  # a torch without oneDNN bf16
    ("avx2 avx512f avx512bw", "x86_64", True, None),     # AVX-512 without bf16: left to a measurement
    ("fp asimd bf16", "aarch64", True, None),
    ("", "x86_64", True, None),                          # no /proc/cpuinfo
])
def test_capabilities_settle_what_they_can(flags, machine, mkldnn, expected):
    found = precision.decide_from_capabilities(facts(flags, machine, mkldnn_bf16=mkldnn))
    assert (None if found is None else found.bf16) is expected
    if found is not None:
        assert found.reason and found.measurement is None


@pytest.mark.parametrize("cap, left", [
    (None, "avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16"),
    ("AVX512_CORE_AMX", "avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16"),
    ("AVX512_CORE_BF16", "avx2 avx512f avx512bw avx512_vnni avx512_bf16"),
    ("avx512_core_vnni", "avx2 avx512f avx512bw avx512_vnni"),
    ("AVX2", "avx2"),
])
def test_flags_follow_onednns_instruction_set_cap(cap, left):
    """ONEDNN_MAX_CPU_ISA keeps oneDNN off the instructions above it: their flags no longer count, so an AMX CPU
    capped below bf16 is timed (its bf16 is emulated) instead of taking bf16 from its flags."""
    flags = frozenset("avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16".split())
    usable = precision.usable_cpu_flags(flags, {"ONEDNN_MAX_CPU_ISA": cap} if cap else {})
    assert usable == frozenset(left.split())
    assert precision.usable_cpu_flags(flags, {"DNNL_MAX_CPU_ISA": "AVX2"}) == {"avx2"}
    assert precision.usable_cpu_flags(flags, {"ONEDNN_MAX_CPU_ISA": "ALL"}) == flags
    found = precision.decide_from_capabilities(facts(" ".join(usable)))
    expected = {"avx2": False, "avx512_core_vnni": None}.get((cap or "").lower(), True)
    assert (None if found is None else found.bf16) is expected


def test_capped_cpu_facts_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not any(flag.startswith(("avx512", "amx")) for flag in precision.cpu_facts().flags)


def _no_measuring():
    raise AssertionError("measured although the answer was known")


def test_known_answers_never_time_anything(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "measure_bf16", _no_measuring)
    settings = SimpleNamespace(catalog_file=str(tmp_path / "catalog.json"))
    assert precision.decide(settings, facts("avx2 fma")).bf16 is False
    assert precision.decide(settings, facts("avx512f avx512_bf16")).bf16 is True
    assert not (tmp_path / precision.CACHE_FILE_NAME).exists()


def test_open_case_is_measured_once_per_machine_class_and_cached(monkeypatch, tmp_path):
    settings = SimpleNamespace(catalog_file=str(tmp_path / "state" / "catalog.json"))
    calls = []

    def measure():
        calls.append(1)
        return Bf16Measurement(10.0, 4.0)

    monkeypatch.setattr(precision, "measure_bf16", measure)
    skylake = facts("avx2 avx512f avx512bw")
    first = precision.decide(settings, skylake)
    assert first.bf16 and first.measurement == Bf16Measurement(10.0, 4.0) and len(calls) == 1
    cache = tmp_path / "state" / precision.CACHE_FILE_NAME
    entry = json.loads(cache.read_text())["entries"][skylake.key]
    assert entry["fp32_ms"] == 10.0 and entry["bf16_ms"] == 4.0 and entry["torch"] == "2.13.0"

    monkeypatch.setattr(precision, "measure_bf16", _no_measuring)
    again = precision.decide(settings, skylake)
    assert again.bf16 and again.measurement == first.measurement and "measured before" in again.reason

    # Another torch (or CPU model, or flags) is another class: measured again, both kept.
    monkeypatch.setattr(precision, "measure_bf16", lambda: Bf16Measurement(10.0, 9.5))
    newer = facts("avx2 avx512f avx512bw", torch_version="2.14.0")
    assert newer.key != skylake.key
    assert precision.decide(settings, newer).bf16 is False
    assert set(json.loads(cache.read_text())["entries"]) == {skylake.key, newer.key}


def test_unreadable_cache_is_replaced(monkeypatch, tmp_path):
    (tmp_path / precision.CACHE_FILE_NAME).write_text("{not json")
    settings = SimpleNamespace(catalog_file=str(tmp_path / "catalog.json"))
    monkeypatch.setattr(precision, "measure_bf16", lambda: Bf16Measurement(10.0, 20.0))
    arm = facts("fp asimd", machine="aarch64")
    assert precision.decide(settings, arm).bf16 is False
    assert precision.read_cached(str(tmp_path / precision.CACHE_FILE_NAME), arm) == Bf16Measurement(10.0, 20.0)


def test_unwritable_cache_folder_still_decides(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = SimpleNamespace(catalog_file=str(blocker / "catalog.json"))  # its folder is a file
    monkeypatch.setattr(precision, "measure_bf16", lambda: Bf16Measurement(10.0, 5.0))
    assert precision.decide(settings, facts("avx512f")).bf16 is True


def test_this_machine_follows_its_flags():
    here = precision.cpu_facts()
    known = precision.decide_from_capabilities(here)
    if known is not None:
        assert precision.decide(SimpleNamespace(catalog_file=None), here) == known
    if here.machine == "x86_64" and here.mkldnn_bf16 and "avx512_bf16" in here.flags:
        assert known.bf16
    if here.machine == "x86_64" and "avx512f" not in here.flags:
        assert known is not None and not known.bf16


def test_flags_still_win(monkeypatch):
    import torch

    from comfy_serverless.settings import default_settings

    monkeypatch.setattr(precision, "_decision", precision.Decision(True, "test"))
    assert precision.unet_dtype(default_settings(force_fp32=True)) == torch.float32
    assert precision.vae_dtype(default_settings(fp32_vae=True)) == torch.float32
    assert precision.unet_dtype(default_settings()) == torch.bfloat16
    monkeypatch.setattr(precision, "_decision", precision.Decision(False, "test"))
    assert precision.unet_dtype(default_settings(bf16_unet=True)) == torch.bfloat16
    assert precision.text_encoder_dtype(default_settings()) == torch.float32
