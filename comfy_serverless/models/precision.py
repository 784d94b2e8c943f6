"""Which dtype each model computes in: flags first, otherwise a measurement of this CPU.

bf16 runs 2-2.4x faster than fp32 on CPUs with native bf16 (avx512_bf16, AMX) and slower where it is
emulated; fp16 is emulated almost everywhere on CPU (hundreds of times slower), so it is only used when a
flag asks for it. Rather than guess from CPU flags, we time a small matmul and convolution in both dtypes
once per process (about 30 ms) and pick bf16 only when it is clearly faster.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# bf16 must take at most this fraction of the fp32 time to be chosen ("clearly faster").
BF16_MAX_TIME_RATIO = 0.8
_ROUNDS = 3


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


_measurement: Bf16Measurement | None = None
_lock = threading.Lock()


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


def _measured_default():
    import torch

    return torch.bfloat16 if measure_bf16().bf16_is_faster else torch.float32


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
