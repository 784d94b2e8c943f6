"""The container scenario: `podman run` of deploy/Dockerfile's image against the plain `pip install` start.

Measured in the same run, alternating (container, plain, container, plain, ...), each with --warmup lazy and the
default background warm-up:
- start: from spawning `podman run -d -p PORT:8188 -e CUDA_VISIBLE_DEVICES="" IMAGE` (the seed's command), or
  `.venv/bin/comfy-serverless serve`, to the first 200 on GET /system_stats, polled every 5 ms
  (the seed's "container start" and "first API response" rows are this one number here);
- idle memory: VmRSS of the server process and its children 1 s after that answer (same method both ways);
- the image's size, and the build time when this run builds it.
With --env-matrix it also measures the environment variables the seed set (PYTHONOPTIMIZE, thread limits,
...) inside the image, to decide which the Dockerfile keeps.

    .venv/bin/python benchmarks/container.py [--runs 5] [--image TAG | --build] [--env-matrix] [--json out.json]

Needs podman (scripts/container_tools.sh) and root; builds the image with deploy/local_image.py when none is
given and `localhost/comfy-serverless:bench` does not exist.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
sys.path.insert(0, str(REPO / "benchmarks"))
import local_image  # noqa: E402
from coldstart import SERVER, free_port, row, rss_tree_kb  # noqa: E402
from machine import describe as describe_machine  # noqa: E402

DEFAULT_TAG = "localhost/comfy-serverless:bench"
POLL_S = 0.005


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=local_image.podman_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed: {result.stderr[-2000:]}")
    return result


def first_200(port: int, started: float, timeout: float = 120) -> float:
    while time.perf_counter() - started < timeout:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/system_stats")
            if conn.getresponse().status == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError("no answer")


def container_run(image: str, warmup: str) -> tuple[float, float]:
    """(seconds from `podman run` to the first 200, RSS MB of the server 1 s later)."""
    port = free_port()
    name = f"comfy-bench-{os.getpid()}-{port}"
    started = time.perf_counter()
    launcher = subprocess.Popen(["podman", "run", "-d", "--name", name, "-p", f"{port}:8188",
                                 "-e", "CUDA_VISIBLE_DEVICES=", "-e", f"COMFY_WARMUP={warmup}", image],
                                env=local_image.podman_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = first_200(port, started)
        launcher.wait(30)
        time.sleep(1.0)
        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())
        return ready, rss_tree_kb(pid) / 1024
    finally:
        launcher.wait(30)
        podman("rm", "-f", "-v", "-t", "0", name, check=False)


def plain_run(base: Path, warmup: str) -> tuple[float, float]:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([*SERVER, "--port", str(port), "--base-directory", str(base), "--warmup", warmup,
                             "--dont-print-server", "--verbose", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(base))
    try:
        ready = first_200(port, started)
        time.sleep(1.0)
        return ready, rss_tree_kb(proc.pid) / 1024
    finally:
        proc.terminate()
        proc.wait(30)


# -- the seed's environment variables, measured inside the image ------------------------------------------
IMPORT_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
# A convolution of the size a 256 px SD1.5 UNet block runs (320 channels, 32x32 latent, batch 2).
CONV = ("import time, torch; x = torch.randn(2, 320, 32, 32); w = torch.randn(320, 320, 3, 3); "
        "torch.nn.functional.conv2d(x, w, padding=1); t = time.perf_counter(); "
        "[torch.nn.functional.conv2d(x, w, padding=1) for _ in range(20)]; print(time.perf_counter() - t)")
ENV_VARIANTS = {
    "image defaults": [],
    "PYTHONOPTIMIZE=2": ["-e", "PYTHONOPTIMIZE=2"],
    "PYTHONDONTWRITEBYTECODE unset": ["-e", "PYTHONDONTWRITEBYTECODE="],
    "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1": ["-e", "OMP_NUM_THREADS=1", "-e", "MKL_NUM_THREADS=1"],
    "CUDA_VISIBLE_DEVICES unset": ["-e", "CUDA_VISIBLE_DEVICES"],
}


def in_container(image: str, env: list[str], code: str) -> float:
    result = podman("run", "--rm", *env, "--entrypoint", "python", image, "-c", code)
    return float(result.stdout.strip().splitlines()[-1])


def env_matrix(image: str, runs: int) -> dict:
    results: dict[str, dict[str, list[float]]] = {name: {"import_torch_s": [], "conv_s": []}
                                                   for name in ENV_VARIANTS}
    for _ in range(runs):
        for name, env in ENV_VARIANTS.items():
            results[name]["import_torch_s"].append(in_container(image, env, IMPORT_TORCH))
            results[name]["conv_s"].append(in_container(image, env, CONV))
    # Does the server still work with docstrings stripped?
    port = free_port()
    name = f"comfy-bench-oo-{os.getpid()}"
    podman("run", "-d", "--name", name, "-p", f"{port}:8188", "-e", "PYTHONOPTIMIZE=2", "-e", "COMFY_WARMUP=eager",
           image)
    try:
        first_200(port, time.perf_counter(), timeout=180)
        body = json.dumps({"prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "oo"}}}})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/prompt", body=body)
        prompt_id = json.loads(conn.getresponse().read())["prompt_id"]
        status = "no answer"
        for _ in range(300):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"/history/{prompt_id}")
            entry = json.loads(conn.getresponse().read()).get(prompt_id)
            if entry:
                status = entry["status"]["status_str"]
                break
            time.sleep(0.1)
    finally:
        podman("rm", "-f", "-v", "-t", "0", name, check=False)
    return {"variants": results, "pythonoptimize2_workflow": status}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", help="an already built image (default: build or reuse " + DEFAULT_TAG + ")")
    parser.add_argument("--build", action="store_true", help="(re)build the image first and time the build")
    parser.add_argument("--env-matrix", action="store_true", help="also measure the seed's environment variables")
    parser.add_argument("--env-matrix-only", action="store_true", help="only the environment variables")
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    if shutil.which("podman") is None:
        sys.exit("podman is missing: scripts/container_tools.sh")
    machine = describe_machine()
    print(machine, flush=True)  # the figures below hold for this CPU only
    image = args.image or DEFAULT_TAG
    build_s = None
    if args.build or (not args.image and not local_image.image_exists(image)):
        local_image.ensure_base_image(log=lambda m: print(m, file=sys.stderr))
        ca = local_image.HOST_CA_BUNDLE if os.path.exists(local_image.HOST_CA_BUNDLE) else None
        build_s = local_image.build_image(image, torch_wheel=local_image.find_torch_wheel(), ca_bundle=ca,
                                          log=lambda m: None)
    size_mb = local_image.image_size_bytes(image) / 1e6

    if args.env_matrix_only:
        print_env_matrix(env_matrix(image, args.runs))
        return 0
    base = Path(tempfile.mkdtemp(prefix="container-bench-"))
    results: dict[str, list[float]] = {k: [] for k in (
        "container_lazy_s", "plain_lazy_s", "container_background_s", "plain_background_s",
        "container_lazy_rss_mb", "plain_lazy_rss_mb", "container_background_rss_mb", "plain_background_rss_mb")}
    try:
        plain_run(base, "lazy")  # warm-up: this base directory's catalogue snapshot, page cache
        container_run(image, "lazy")
        for _ in range(args.runs):
            for warmup in ("lazy", "background"):
                ready, rss = container_run(image, warmup)
                results[f"container_{warmup}_s"].append(ready)
                results[f"container_{warmup}_rss_mb"].append(rss)
                ready, rss = plain_run(base, warmup)
                results[f"plain_{warmup}_s"].append(ready)
                results[f"plain_{warmup}_rss_mb"].append(rss)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"container vs plain start, {args.runs} runs, {os.cpu_count()} CPUs, image {image} "
          f"({size_mb:.0f} MB{f', built in {build_s:.0f} s' if build_s else ''})\n")
    print("| figure | min | median | max | unit |\n|---|---|---|---|---|")
    print(row("`podman run` to first 200 on /system_stats, --warmup lazy", results["container_lazy_s"], "s"))
    print(row("plain `comfy-serverless serve` to first 200, --warmup lazy", results["plain_lazy_s"], "s"))
    print(row("`podman run` to first 200, background warm-up (default)", results["container_background_s"], "s"))
    print(row("plain start to first 200, background warm-up (default)", results["plain_background_s"], "s"))
    print(row("container idle RSS 1 s after ready, lazy", results["container_lazy_rss_mb"], "MB"))
    print(row("plain idle RSS 1 s after ready, lazy", results["plain_lazy_rss_mb"], "MB"))
    print(row("container RSS 1 s after ready, background (torch loading)", results["container_background_rss_mb"],
              "MB"))
    print(row("plain RSS 1 s after ready, background (torch loading)", results["plain_background_rss_mb"], "MB"))
    overhead = statistics.median(results["container_lazy_s"]) - statistics.median(results["plain_lazy_s"])
    print(f"\ncontainer overhead on the first answer (medians, lazy): {overhead:+.3f} s; image {size_mb:.0f} MB")

    matrix = None
    if args.env_matrix:
        matrix = env_matrix(image, args.runs)
        print_env_matrix(matrix)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "machine": machine, "image": image,
                                               "image_mb": size_mb, "build_s": build_s, "results": results,
                                               "env_matrix": matrix}, indent=2))
    return 0


def print_env_matrix(matrix: dict) -> None:
    print("\n| inside the image | import torch (median) | 20 conv2d 320ch 32x32 batch 2 (median) |\n|---|---|---|")
    for name, values in matrix["variants"].items():
        print(f"| {name} | {statistics.median(values['import_torch_s']):.3f} s "
              f"| {statistics.median(values['conv_s']):.3f} s |")
    print(f"\nserver with PYTHONOPTIMIZE=2: workflow {matrix['pythonoptimize2_workflow']}")


if __name__ == "__main__":
    raise SystemExit(main())
