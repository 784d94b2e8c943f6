"""How close the UNet step and the VAE decode come to this machine's convolution peak (issue 12).

    .venv/bin/python benchmarks/kernel_peak.py [--size 256] [--runs 5] [--dtype auto|fp32|bf16]
        [--isa native|avx2|avx512]

1. The peak: 3x3 convolutions of the shapes SD1.5's UNet and VAE use, each the fastest way torch can run a direct
   convolution: one oneDNN primitive with its weight packed once, on an NCHW or a channels_last input, or the
   stock F.conv2d on channels_last tensors (on AMX CPUs the channels_last ones were up to 2x faster), best of
   --runs; the highest GFLOP/s is "the machine's measured convolution peak" for the dtype.
2. The UNet (cfg batch of 2) and the VAE decode of the full-size SD1.5-architecture checkpoint (random weights,
   benchmarks/.cache, prepared as the server would), median of --runs after one call that packs; their FLOPs
   are counted by torch's FlopCounterMode on the stock layers (direct convolutions), so the Winograd VAE can
   show more than 100 % of the direct peak. Then the same with COMFY_CPU_KERNELS=0 (torch's stock layers).
   The table gives the median and the best run: the peak is a best run too, and where the machine's speed
   drifts (an AMX Xeon here ran a bf16 matmul at 1950 GFLOP/s for seconds, then at 750, with no steal time)
   best against best compares the same machine state.
3. Where the time goes (layer_breakdown.py): --runs rounds of the peak re-measured (best of 2 calls), then
   one UNet step (or VAE decode) with each layer call timed; medians of the step's share of that round's peak,
   of its seconds in convolutions, linears, attention and the rest, and of the share it would reach with every
   convolution and linear at the peak: how far kernels alone could take it.

--isa avx2 caps torch, oneDNN and MKL at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS;
set before torch is imported, so the script re-runs itself with them), standing in for an AVX2-only CPU; --isa
avx512 at AVX-512 with VNNI but no bf16 (compare_comfyui.ISA_CAPS).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from compare_comfyui import ISA_CAPS, PREPARED, ours_build  # run as a script: benchmarks/ is on sys.path
from first_image import CACHE, CHECKPOINT, ensure_checkpoint
from layer_breakdown import measure as measure_parts
from layer_breakdown import table as parts_table
from machine import describe as describe_machine

PEAK_SHAPES = [(2, 320, 32), (2, 640, 16), (2, 1280, 16), (2, 1280, 8), (1, 512, 64), (1, 256, 128)]


def timings(run, runs: int) -> list[float]:
    """Seconds of `runs` calls of run(), after one untimed call (kernel selection, packing)."""
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def convolution_variants(x, weight) -> dict:
    """The ways torch runs a direct 3x3 convolution of x with weight, as calls with everything prepared."""
    import torch
    import torch.nn.functional as F

    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
    x_last = x.contiguous(memory_format=torch.channels_last)
    weight_last = weight.contiguous(memory_format=torch.channels_last)
    return {
        "packed": lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], ""),
        "packed, channels_last": lambda: torch.ops.mkldnn._convolution_pointwise(
            x_last, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], ""),
        "stock, channels_last": lambda: F.conv2d(x_last, weight_last, None, 1, 1),
    }


def convolution_peak(dtype, runs: int):
    """The best GFLOP/s of any shape and variant, and a probe that re-measures it (best of 2 calls each): on a
    machine whose speed drifts, a figure compared with the peak is compared with the probe's reading next to it."""
    import torch

    calls = []
    for batch, channels, size in PEAK_SHAPES:
        x = torch.randn(batch, channels, size, size).to(dtype)
        weight = (torch.randn(channels, channels, 3, 3) * 0.02).to(dtype)
        label = f"conv 3x3 {channels}->{channels} at {size}x{size}, batch {batch}"
        calls.append((label, convolution_variants(x, weight), 2 * batch * channels * channels * 9 * size * size))

    def measure(tries: int, report: bool) -> float:
        best = 0.0
        for label, variants, flops in calls:
            rates = {name: flops / min(timings(run, tries)) / 1e9 for name, run in variants.items()}
            if report:
                print(f"  {label}: " + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items()) + " GFLOP/s",
                      flush=True)
            best = max(best, *rates.values())
        return best

    return measure(runs, True), lambda: measure(2, False)


def compute_dtype(choice: str):
    """--dtype's name ("auto": what the server would choose on this CPU) and torch dtype."""
    import torch

    from comfy_serverless.models import precision

    if choice == "auto":  # the flags, else the server's timed probe (no cache: measured in this process)
        choice = "bf16" if precision.decide(SimpleNamespace(catalog_file=None)).bf16 else "fp32"
    return choice, torch.bfloat16 if choice == "bf16" else torch.float32


def networks(dtype_name: str):
    from comfy_serverless import context
    from comfy_serverless.models.loading import load_checkpoint
    from comfy_serverless.settings import default_settings

    flags = {"force_fp32": dtype_name == "fp32", "bf16_unet": dtype_name == "bf16", "bf16_vae": dtype_name == "bf16"}
    base = tempfile.mkdtemp(prefix="kernel-peak-")
    own = context.ServerContext(default_settings(base_directory=base, **{k: v for k, v in flags.items() if v}))
    token = own.activate()
    try:
        model, _, vae = load_checkpoint(str(CACHE / CHECKPOINT))
        return model.handle.get(), vae.handle.get()
    finally:
        context.deactivate(token)


def stock_layers(on: bool) -> None:
    """COMFY_CPU_KERNELS=0 (torch's stock Conv2d / Linear) from now on, or back to the default."""
    from comfy_serverless.networks import cpu_kernels

    if on:
        os.environ[cpu_kernels.ENV] = "0"
    else:
        os.environ.pop(cpu_kernels.ENV, None)
    cpu_kernels._mode.cache_clear()
    cpu_kernels._winograd_min_pixels.cache_clear()


def count_flops(run) -> float:
    """FLOPs of run() on torch's stock layers (direct convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    stock_layers(True)
    try:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()
    finally:
        stock_layers(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--isa", choices=tuple(ISA_CAPS), default="native")
    args = parser.parse_args()
    caps = ISA_CAPS[args.isa]
    if any(os.environ.get(key) != value for key, value in caps.items()):
        return subprocess.call([sys.executable, *sys.argv], env={**os.environ, **caps})
    os.environ["COMFY_PREPARED_DIR"] = str(PREPARED)
    shutil.rmtree(ours_build(ensure_checkpoint(), args.size)[2], ignore_errors=True)  # snapshot + prepare
    import torch

    print(describe_machine(), flush=True)
    print(f"torch {torch.__version__}, ATen capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    dtype_name, dtype = compute_dtype(args.dtype)
    print(f"dtype {dtype_name}; measured convolution peak:", flush=True)
    with torch.inference_mode():
        peak, peak_now = convolution_peak(dtype, args.runs)
        unet, vae = networks(dtype_name)
        latent = args.size // 8
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, latent, latent, generator=generator).to(dtype)
        context = torch.randn(2, 77, 768, generator=generator).to(dtype)
        timestep = torch.tensor([500.0, 500.0])
        run_unet, run_vae = (lambda: unet(x, timestep, context)), (lambda: vae.decode(x[:1]))
        unet_flops, vae_flops = count_flops(run_unet), count_flops(run_vae)
        rows = []
        for stock in (False, True):
            stock_layers(stock)
            kind = "stock torch layers" if stock else "cpu_kernels"
            for label, run, flops in (("UNet step (cfg batch 2)", run_unet, unet_flops),
                                      (f"VAE decode {args.size}x{args.size}", run_vae, vae_flops)):
                times = timings(run, args.runs)
                rows.append((f"{label}, {kind}", flops, statistics.median(times), min(times)))
                print(f"  {rows[-1][0]}: median {rows[-1][2]:.2f} s, best {rows[-1][3]:.2f} s", flush=True)
        stock_layers(False)
        parts = [parts_table(label, measure_parts(model, run, args.runs, peak_now))
                 for label, model, run in (("UNet step", unet, run_unet), ("VAE decode", vae, run_vae))]
    print(f"\npeak {peak:.0f} GFLOP/s ({dtype_name}, fastest direct 3x3 convolution); {args.size}x{args.size}, "
          f"medians of {args.runs}\n")
    print("| network | GFLOP | median | GFLOP/s | of peak | best run | of peak |\n|---|---|---|---|---|---|---|")
    for label, flops, median, best in rows:
        rate, best_rate = flops / median / 1e9, flops / best / 1e9
        print(f"| {label} | {flops / 1e9:.0f} | {median:.2f} s | {rate:.0f} | {100 * rate / peak:.0f} % | "
              f"{best:.2f} s | {100 * best_rate / peak:.0f} % |")
    print("\nWhere the time goes (cpu_kernels; --runs rounds of the peak re-measured, then one call with each layer"
          " call timed):")
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
