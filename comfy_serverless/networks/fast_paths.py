"""Faster CPU layouts for the UNet and VAE: activations in channels_last (NHWC) memory format.

oneDNN's CPU convolutions compute in NHWC/blocked layouts; fed NCHW tensors, every convolution reorders its
input and output, about a tenth of a UNet step at 256 px. Converting the latent once at the entry keeps the
whole graph in channels_last: convolutions, GroupNorm and SiLU keep the format, and the transformer blocks'
NCHW -> tokens permute becomes a free view. Weights stay as they are (memory-mapped): oneDNN reorders
weights into its blocked format on every call whatever their layout, so converting them buys nothing.

Measured, and so the default policy (COMFY_CHANNELS_LAST=auto):
- AVX2-only AMD EPYC (issue 12, fp32, 256 px): UNet step 3.92 -> 3.59 s, VAE decode 4.52 -> 4.11 s: both on.
- AMD EPYC with AVX-512 + avx512_bf16 (2026-12-01, this project's machine, 2 threads, min of 3-4 alternating
  rounds, loaded machine): VAE decode 256 px bf16 0.89 -> 0.71 s and 0.90 -> 0.76 s, fp32 2.94 -> 2.65 s: on;
  UNet step (batch 2, 32x32) bf16 0.74 -> 0.95 s and 0.89 -> 0.98 s, fp32 6.4 -> 9.9 s: slower, so off.
  Again at load average ~2: VAE bf16 0.87 -> 0.71 s, fp32 2.13 -> 1.72 s; UNet bf16 1.42 -> 1.30 s (CPU time
  2.18 -> 2.42 s, i.e. no gain), fp32 2.34 -> 3.00 s.
So the VAE always runs channels_last, the UNet only on CPUs without AVX-512 (as far as ONEDNN_MAX_CPU_ISA lets
oneDNN use it: precision.usable_cpu_flags). Since cpu_kernels.py packs the UNet's weights, its convolutions answer
channels_last whatever this policy says, so for the UNet the policy decides only the first convolution's input:
measured again on the AMX Xeon (2026-12-02, paired medians of 7-9 alternating steps, SD1.5 at 256 px), channels_last
over NCHW 1.02x under the AVX2 cap, 0.96x under the AVX-512 cap (fp32), 0.99x in bf16, outputs bit-identical.

Results equal the NCHW path within rounding (fp32: ~2e-5 absolute on a full UNet; bf16: bf16 rounding).

ComfyUI model patches keep working: the UNet's block patches (input_block_patch, input_block_patch_after_skip,
output_block_patch), written for NCHW tensors and free to .view() them, get NCHW-contiguous copies and their
results go back to channels_last (`plain_layout_block_patches`), so an identity patch changes nothing; attention
patches see [B, tokens, C] tensors, contiguous in either layout. ControlNet residuals, LoRA (replaced weights)
and interrupts are unaffected. COMFY_CHANNELS_LAST=0 turns it off.

Not done here: fused GroupNorm + SiLU (torch 2.13 has no eager CPU kernel for it; only torch.compile fuses).
Weight prepacking lives in cpu_kernels.py; OpenVINO is measured against it in benchmarks/openvino_compare.py.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "COMFY_CHANNELS_LAST"
_OFF = ("0", "false", "no", "off", "none")
_ALL = ("1", "true", "yes", "on", "all")


@functools.cache
def _cpu_has_avx512() -> bool:
    from ..models.precision import read_cpu_flags, usable_cpu_flags  # standard library only at import

    return "avx512f" in usable_cpu_flags(read_cpu_flags()[1])


def channels_last_enabled(network: str = "unet") -> bool:
    """COMFY_CHANNELS_LAST: auto (default; the measured policy above), 1/all, 0/none, unet or vae."""
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ALL:
        return True
    if setting in ("unet", "vae"):
        return network == setting
    return network == "vae" or not _cpu_has_avx512()


def conv_input(x: torch.Tensor, network: str = "unet") -> torch.Tensor:
    """`x` [B, C, H, W] in the memory format `network`'s convolutions run fastest in (values unchanged). Not
    while torch.compile traces, and decided before anything else there: inductor picks layouts itself, and the
    policy's CPU-flag lookup broke the traced UNet graph in two, whose AVX2 code then gave NaN everywhere (torch
    2.13 under ATEN_CPU_CAPABILITY=avx2; the AVX-512 code was right)."""
    if torch.compiler.is_compiling():
        return x
    if x.dim() != 4 or x.device.type != "cpu" or not channels_last_enabled(network):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def plain_layout_block_patches(patches: dict) -> dict:
    """`patches` with the UNet's 4D block patches wrapped to see NCHW-contiguous tensors (see module doc)."""
    if not patches:  # cpu_kernels' packed convolutions answer channels_last whatever the policy here
        return patches
    wrapped = dict(patches)
    for name in ("input_block_patch", "input_block_patch_after_skip"):
        if patches.get(name):
            wrapped[name] = [_plain_h(patch) for patch in patches[name]]
    if patches.get("output_block_patch"):
        wrapped["output_block_patch"] = [_plain_h_skip(patch) for patch in patches["output_block_patch"]]
    return wrapped


def _plain_h(patch):
    def run(h, options):
        return _layout_of(h, patch(h.contiguous(), options))

    return run


def _plain_h_skip(patch):
    def run(h, skip, options):
        new_h, new_skip = patch(h.contiguous(), skip.contiguous(), options)
        return _layout_of(h, new_h), _layout_of(skip, new_skip)

    return run


def _layout_of(original: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` in `original`'s memory format, so an identity patch changes nothing (kernels round differently
    per layout)."""
    if original.dim() == 4 and not original.is_contiguous() and original.is_contiguous(
            memory_format=torch.channels_last):
        return result.contiguous(memory_format=torch.channels_last)
    return result
