"""Our UNet step and VAE decode against OpenVINO's on the same weights, alternating in one process (issue 12).

OpenVINO compiles the whole graph (fused attention, norms and activations, its own AMX/AVX-512 kernels), so it
tells how much a graph compiler could buy over our eager CPU kernels on this CPU. It is not a dependency of the
project; install it beside the virtual environment and put it on the path:

    .venv/bin/python -m pip install --target /tmp/ovpkgs openvino && rm -rf /tmp/ovpkgs/numpy*
    PYTHONPATH=/tmp/ovpkgs .venv/bin/python benchmarks/openvino_compare.py [--runs 8] [--dtype auto|fp32|bf16]

The networks are kernel_peak.py's (SD1.5 architecture, random weights, cfg batch of 2 at 256 px, prepared as the
server would); OpenVINO converts an fp32 copy built with torch's stock layers and runs it at the same inference
precision as ours. Each round times one call of each of the four, in turn, so drift hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from compare_comfyui import PREPARED, ours_build  # run as a script: benchmarks/ is on sys.path
from first_image import ensure_checkpoint
from kernel_peak import compute_dtype, networks, stock_layers
from machine import describe as describe_machine


def openvino_networks(unet, vae, x, timestep, context, precision: str):
    import openvino as ov
    import torch

    class Call(torch.nn.Module):
        """A network's call as a module's forward, the network a submodule (its weights traced as constants)."""

        def __init__(self, network, call):
            super().__init__()
            self.network, self.call = network, call

        def forward(self, *inputs):
            return self.call(*inputs)

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": "1",
              "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}
    with torch.no_grad():
        unet_model = ov.convert_model(Call(unet, unet), example_input=(x, timestep, context))
        vae_model = ov.convert_model(Call(vae, vae.decode), example_input=(x[:1],))
    return (core.compile_model(unet_model, "CPU", config).create_infer_request(),
            core.compile_model(vae_model, "CPU", config).create_infer_request())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    args = parser.parse_args()
    os.environ["COMFY_PREPARED_DIR"] = str(PREPARED)
    ours_build(ensure_checkpoint(), 256)  # snapshot + prepare, as kernel_peak.py
    import openvino
    import torch

    dtype_name, dtype = compute_dtype(args.dtype)
    print(describe_machine(), flush=True)
    print(f"torch {torch.__version__}, OpenVINO {openvino.__version__}, {torch.get_num_threads()} threads, "
          f"{dtype_name}", flush=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        unet, vae = networks(dtype_name)
    stock_layers(True)
    with torch.inference_mode():
        unet_fp32, vae_fp32 = networks("fp32")
    stock_layers(False)
    start = time.perf_counter()
    ov_unet, ov_vae = openvino_networks(unet_fp32, vae_fp32, x, timestep, context, dtype_name.replace("fp", "f"))
    print(f"OpenVINO convert + compile: {time.perf_counter() - start:.1f} s", flush=True)
    with torch.inference_mode():
        reference = vae_fp32.decode(x[:1])
    del unet_fp32, vae_fp32
    xd, cd = x.to(dtype), context.to(dtype)
    calls = {
        "UNet step, ours": lambda: unet(xd, timestep, cd),
        "UNet step, OpenVINO": lambda: ov_unet.infer([x.numpy(), timestep.numpy(), context.numpy()]),
        "VAE decode, ours": lambda: vae.decode(xd[:1]),
        "VAE decode, OpenVINO": lambda: ov_vae.infer([x[:1].numpy()]),
    }
    with torch.inference_mode():
        ours_image = vae.decode(xd[:1]).float()
        openvino_image = torch.from_numpy(ov_vae.infer([x[:1].numpy()])[0])
        print(f"VAE decode against torch fp32: ours {float((ours_image - reference).abs().max()):.3f}, OpenVINO "
              f"{float((openvino_image - reference).abs().max()):.3f} (max abs difference)", flush=True)
        times: dict[str, list[float]] = {label: [] for label in calls}
        for call in calls.values():
            call()
        for _ in range(args.runs):
            for label, call in calls.items():
                started = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - started)
    print("\n| call | median | best |\n|---|---|---|")
    for label, seconds in times.items():
        print(f"| {label} | {statistics.median(seconds):.3f} s | {min(seconds):.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
