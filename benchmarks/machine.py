"""The machine a benchmark ran on, printed before its table: the figures only hold for that CPU.

What matters for this CPU-only server is the instruction set: bf16 is only fast with avx512_bf16 or AMX
(comfy_serverless/models/precision.py decides from these flags, and measures only where they leave it open),
and avx2 / avx512f set the fp32 speed.
"""

from __future__ import annotations

import os
from pathlib import Path

FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_model_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, flags) of the first processor listed; ("unknown", set()) where /proc/cpuinfo is missing."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "unknown", set()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif not line.strip() and model != "unknown" and flags:
            break  # the first processor's block is enough
    return model, flags


# Environment variables that make torch / oneDNN use less than the CPU has (an AVX2-only CPU stood in for).
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def describe(cpuinfo: str = "/proc/cpuinfo") -> str:
    """One line: CPU model, CPU count and which of FLAGS_THAT_MATTER it has."""
    model, flags = cpu_model_and_flags(cpuinfo)
    has = [name for name in FLAGS_THAT_MATTER if name in flags]
    lacks = [name for name in FLAGS_THAT_MATTER if name not in flags]
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAP_VARIABLES if os.environ.get(name)]
    return (f"machine: {model}, {os.cpu_count()} CPUs; has {', '.join(has) or 'none of them'}"
            f"{'; lacks ' + ', '.join(lacks) if lacks else ''}"
            f"{'; instruction set capped by ' + ' '.join(caps) if caps else ''}")


def precision_line(python: str) -> str:
    """What the server will compute in on this CPU, asked of the project's own code in `python` (a subprocess,
    so a benchmark does not import torch itself)."""
    import subprocess

    code = ("from comfy_serverless.models import precision as p; f = p.cpu_facts(); "
            "d = p.decide_from_capabilities(f); "
            "print('torch', f.torch_version, '; default compute dtype', "
            "'measured at the first start, then cached' if d is None else ('bf16' if d.bf16 else 'fp32') "
            "+ ' (' + d.reason + ')')")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or f"precision unknown ({done.stderr.strip()[-200:]})"


def print_header() -> None:
    print(describe(), flush=True)
