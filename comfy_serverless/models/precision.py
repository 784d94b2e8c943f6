"""Which dtype each model computes in: flags first, then what the CPU's instruction set settles, and a
measurement only where it leaves the answer open.

bf16 runs 2-2.4x faster than fp32 where the CPU has native bf16 instructions (x86 avx512_bf16 or AMX) and
slower where oneDNN emulates it (bf16 at 1-2 GFLOP/s on an AVX2-only AMD EPYC, issue 12); fp16 is emulated
almost everywhere on CPU, so it is only used when a flag asks for it. The old per-start probe cost about 1 s on
AVX2-only CPUs (its bf16 matmul and convolution are that slow) for an answer the flags already gave; now:
- avx512_bf16 / amx_bf16 -> bf16, no timing;
- x86 without AVX-512 (or a torch without oneDNN bf16) -> fp32, no timing;
- anything else (AVX-512 without bf16, ARM, ...) -> timed once, and the result cached in a small JSON file
  next to the catalogue snapshot (cpu_precision.json), keyed by CPU model + flags + torch version, so a later
  start on the same machine class reads it instead of timing again.
The flags count only as far as ONEDNN_MAX_CPU_ISA lets oneDNN use them (usable_cpu_flags).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# bf16 must take at most this fraction of the fp32 time to be chosen ("clearly faster").
BF16_MAX_TIME_RATIO = 0.8
_ROUNDS = 3
CACHE_FILE_NAME = "cpu_precision.json"
_CACHE_FORMAT = 1
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


@dataclass(frozen=True)
class Bf16Measurement:
    fp32_ms: float
    bf16_ms: float

    @property
    def ratio(self) -> float:
        return self.bf16_ms / self.fp32_ms if self.fp32_ms > 0 else float("inf")

    @property
    def bf16_is_faster(self) -> bool:
        return self.ratio <= BF16_MAX_TIME_RATIO


@dataclass(frozen=True)
class CpuFacts:
    model: str
    flags: frozenset  # those oneDNN may use (usable_cpu_flags)
    machine: str
    torch_version: str
    mkldnn_bf16: bool  # torch's oneDNN reports bf16 kernels (native or emulated)

    @property
    def key(self) -> str:
        """CPU model + all flags + torch version: the machine class a measurement holds for."""
        text = "|".join((self.model, self.machine, " ".join(sorted(self.flags)), self.torch_version))
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Decision:
    bf16: bool
    reason: str
    measurement: Bf16Measurement | None = None


def read_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
    """(model name, flags) of the first processor; ("unknown", empty) where the file is missing (macOS...)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return "unknown", frozenset()
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        elif not line.strip() and flags:
            break  # the first processor's block is enough
    return model, flags


# oneDNN runs no instruction above ONEDNN_MAX_CPU_ISA (DNNL_MAX_CPU_ISA before oneDNN 2.0), whatever the CPU has:
# the flags of instructions each cap leaves out. Capped at AVX512_CORE on an AMX Xeon (a stand-in for the many cloud
# CPUs with AVX-512 but no bf16), bf16 is emulated: the probe's workload took 18.4 ms in bf16 against 4.7 in fp32
# (2026-12-02), while the CPU's own flags still said amx_bf16 and so bf16.
_ABOVE_AVX2 = ("avx512", "amx")
_ABOVE_AVX512_CORE = ("avx512_bf16", "avx512_fp16", "amx")
_FLAGS_ABOVE_CAP = {
    **dict.fromkeys(("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2"), _ABOVE_AVX2),
    **dict.fromkeys(("avx512_core", "avx512_core_vnni"), _ABOVE_AVX512_CORE),
    **dict.fromkeys(("avx512_core_bf16", "avx512_core_fp16", "avx10_1_512"), ("amx",)),
}


def usable_cpu_flags(flags: frozenset, environ=os.environ) -> frozenset:
    """The CPU flags whose instructions oneDNN may use under the process's ONEDNN_MAX_CPU_ISA, if any."""
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    left_out = _FLAGS_ABOVE_CAP.get(cap, ())
    return frozenset(flag for flag in flags if not flag.startswith(left_out))


def cpu_facts() -> CpuFacts:
    import torch

    model, flags = read_cpu_flags()
    flags = usable_cpu_flags(flags)
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = False
    return CpuFacts(model, flags, platform.machine().lower(), torch.__version__, mkldnn_bf16)


def decide_from_capabilities(facts: CpuFacts) -> Decision | None:
    """The answer where the instruction set settles it; None where only a measurement can tell."""
    if facts.machine not in _X86 or not facts.flags:
        return None
    if not facts.mkldnn_bf16:
        return Decision(False, "torch's oneDNN has no bf16 kernels for this CPU")
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in facts.flags:
            return Decision(True, f"the CPU has {flag}")
    if "avx512f" not in facts.flags:
        return Decision(False, "no AVX-512: bf16 would be emulated (1-2 GFLOP/s)")
    return None  # AVX-512 without bf16 instructions: emulation speed varies, so time it


def _time_workload(dtype) -> float:
    """Seconds for one matmul (UNet attention/linear shapes) plus one 3x3 convolution (ResBlock shapes)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 1024, generator=generator).to(dtype)
    b = torch.randn(1024, 1024, generator=generator).to(dtype)
    x = torch.randn(1, 128, 32, 32, generator=generator).to(dtype)
    w = torch.randn(128, 128, 3, 3, generator=generator).to(dtype)
    a @ b  # first call pays kernel selection; not timed
    F.conv2d(x, w, padding=1)
    start = time.perf_counter()
    a @ b
    F.conv2d(x, w, padding=1)
    return time.perf_counter() - start


_measurement: Bf16Measurement | None = None
_decision: Decision | None = None
_lock = threading.Lock()


def measure_bf16() -> Bf16Measurement:
    """Times the workload in fp32 and bf16 (interleaved, best of a few rounds); measured once per process."""
    global _measurement
    with _lock:
        if _measurement is None:
            import torch

            fp32, bf16 = [], []
            try:
                with torch.inference_mode():
                    for _ in range(_ROUNDS):
                        fp32.append(_time_workload(torch.float32))
                        bf16.append(_time_workload(torch.bfloat16))
                result = Bf16Measurement(min(fp32) * 1000, min(bf16) * 1000)
            except RuntimeError as exc:  # a build without bf16 kernels
                log.warning("bf16 is not usable here (%s); computing in fp32", exc)
                result = Bf16Measurement(1.0, float("inf"))
            _measurement = result
            log.info("precision: fp32 %.2f ms, bf16 %.2f ms (ratio %.2f) -> default compute dtype %s",
                     result.fp32_ms, result.bf16_ms, result.ratio, "bf16" if result.bf16_is_faster else "fp32")
        return _measurement


def cache_path(settings=None) -> str | None:
    """cpu_precision.json beside the catalogue snapshot (the build-time state folder)."""
    if settings is None:
        from .. import settings as settings_module

        settings = settings_module.current()
    catalog = getattr(settings, "catalog_file", None)
    return os.path.join(os.path.dirname(os.path.abspath(catalog)), CACHE_FILE_NAME) if catalog else None


def read_cached_entry(path: str | None, section: str, key: str) -> dict | None:
    """One machine class's entry of a measurement kept in the cache file (None if absent or unreadable)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        entry = data[section].get(key) if data.get("format") == _CACHE_FORMAT else None
        return entry if isinstance(entry, dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cached_entry(path: str | None, section: str, key: str, entry: dict) -> None:
    """Adds a machine class's entry to the cache file (atomic replace; a read-only folder only costs the next
    start another measurement)."""
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
            raise ValueError
    except (OSError, ValueError):
        data = {"format": _CACHE_FORMAT}
    if not isinstance(data.get(section), dict):
        data[section] = {}
    data[section][key] = {**entry, "measured_at": time.time()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cpu_precision.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.info("could not cache a CPU measurement in %s (%s)", path, exc)


def read_cached(path: str | None, facts: CpuFacts) -> Bf16Measurement | None:
    entry = read_cached_entry(path, "entries", facts.key)
    try:
        return Bf16Measurement(float(entry["fp32_ms"]), float(entry["bf16_ms"])) if entry else None
    except (KeyError, TypeError, ValueError):
        return None


def write_cached(path: str | None, facts: CpuFacts, measurement: Bf16Measurement) -> None:
    write_cached_entry(path, "entries", facts.key, {"fp32_ms": measurement.fp32_ms, "bf16_ms": measurement.bf16_ms,
                                                    "cpu": facts.model, "torch": facts.torch_version})


def decide(settings=None, facts: CpuFacts | None = None) -> Decision:
    """bf16 or fp32 as the default compute dtype: capabilities, else the cached measurement, else a new one."""
    facts = facts or cpu_facts()
    found = decide_from_capabilities(facts)
    if found is not None:
        return found
    path = cache_path(settings)
    cached = read_cached(path, facts)
    if cached is not None:
        return Decision(cached.bf16_is_faster, f"measured before on this CPU class ({path})", cached)
    measured = measure_bf16()
    write_cached(path, facts, measured)
    return Decision(measured.bf16_is_faster, "measured now", measured)


def default_decision() -> Decision:
    """decide(), once per process."""
    global _decision
    if _decision is None:
        found = decide()
        with _lock:
            if _decision is None:
                _decision = found
                log.info("precision: default compute dtype %s (%s)", "bf16" if found.bf16 else "fp32", found.reason)
    return _decision


def _measured_default():
    import torch

    return torch.bfloat16 if default_decision().bf16 else torch.float32


def apply_torch_flags() -> None:
    """Process-wide torch switches from the server's flags, applied before a model is built (each dtype choice
    below calls this; torch is already imported by then): --deterministic."""
    from .. import settings as settings_module

    if not getattr(settings_module.current(), "deterministic", False):
        return
    import torch

    if not torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True)
        log.info("--deterministic: torch.use_deterministic_algorithms(True)")


def _flags(settings):
    if settings is None:
        from .. import settings as settings_module

        settings = settings_module.current()
    return lambda name: bool(getattr(settings, name, False))


def unet_dtype(settings=None):
    """--force-fp32/--fp32-unet, --bf16-unet, --fp16-unet/--force-fp16, else measured."""
    import torch

    apply_torch_flags()
    flag = _flags(settings)
    if flag("force_fp32") or flag("fp32_unet"):
        return torch.float32
    if flag("bf16_unet"):
        return torch.bfloat16
    if flag("fp16_unet") or flag("force_fp16"):
        return torch.float16
    return _measured_default()


def text_encoder_dtype(settings=None):
    """--fp32-text-enc/--force-fp32, --bf16-text-enc, --fp16-text-enc, else measured."""
    import torch

    apply_torch_flags()
    flag = _flags(settings)
    if flag("fp32_text_enc") or flag("force_fp32"):
        return torch.float32
    if flag("bf16_text_enc"):
        return torch.bfloat16
    if flag("fp16_text_enc"):
        return torch.float16
    return _measured_default()


def vae_dtype(settings=None):
    """--fp16-vae (honoured, though very slow on CPU, as in ComfyUI), --bf16-vae, --fp32-vae/--force-fp32,
    else measured. --force-fp16 does not touch the VAE (ComfyUI's behaviour)."""
    import torch

    apply_torch_flags()
    flag = _flags(settings)
    if flag("fp16_vae"):
        return torch.float16
    if flag("bf16_vae"):
        return torch.bfloat16
    if flag("fp32_vae") or flag("force_fp32"):
        return torch.float32
    return _measured_default()


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")
