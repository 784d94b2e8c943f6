"""Cold start, idle memory and API latency (figures 1-3 of docs/benchmarks.md).

Runs the server the way a user starts it (`.venv/bin/comfy-serverless serve`), alternating with
`python -c "import torch"` so the ratio is measured in the same conditions, and prints min / median / max.

    .venv/bin/python benchmarks/coldstart.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe as describe_machine  # run as a script: benchmarks/ is on sys.path
from machine import precision_line

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
SERVER = [str(VENV_BIN / "comfy-serverless"), "serve"]
PYTHON = str(VENV_BIN / "python")
TXT_PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
INVALID_PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 8, "batch_size": 1,
                                                                "color": 0}},
                  "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_tree_kb(pid: int) -> int:
    """VmRSS of a process and its children (kB)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def time_import_torch() -> float:
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", "import torch"], check=True)
    return time.perf_counter() - started


class Started:
    def __init__(self, base: Path, warmup: str):
        self.port = free_port()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([*SERVER, "--port", str(self.port), "--base-directory", str(base),
                                      "--warmup", warmup, "--dont-print-server", "--verbose", "WARNING"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(base))
        self.ready_s = self._poll_ready()

    def _poll_ready(self) -> float:
        deadline = self.started + 60
        while time.perf_counter() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/system_stats")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def latency(port: int, method: str, path: str, body: bytes | None = None, repeat: int = 200) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        conn.request(method, path, body=body)
        response = conn.getresponse()
        response.read()
        samples.append(time.perf_counter() - started)
    conn.close()
    return samples


def row(name: str, values: list[float], unit: str, scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"| {name} | {min(v):.{3 if unit == 's' else 2}f} | {statistics.median(v):.{3 if unit == 's' else 2}f} " \
           f"| {max(v):.{3 if unit == 's' else 2}f} | {unit} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    if not (VENV_BIN / "comfy-serverless").exists():
        sys.exit("run scripts/setup.sh first")
    machine = describe_machine()
    print(machine, flush=True)  # the figures below hold for this CPU only
    print(precision_line(str(VENV_BIN / "python")), flush=True)

    base = Path(tempfile.mkdtemp(prefix="coldstart-"))
    results: dict[str, list[float]] = {k: [] for k in (
        "import_torch_s", "ready_lazy_s", "ready_background_s", "idle_rss_lazy_mb", "idle_rss_background_mb",
        "system_stats_ms", "object_info_first_ms", "object_info_second_ms", "queue_ms", "post_prompt_ms")}
    try:
        warm = Started(base, "lazy")  # warm-up run: builds this base directory's catalogue snapshot
        latency(warm.port, "GET", "/object_info", repeat=1)
        warm.stop()
        for _ in range(args.runs):
            results["import_torch_s"].append(time_import_torch())
            lazy = Started(base, "lazy")
            results["ready_lazy_s"].append(lazy.ready_s)
            time.sleep(1.0)
            results["idle_rss_lazy_mb"].append(rss_tree_kb(lazy.proc.pid) / 1024)
            results["object_info_first_ms"].append(latency(lazy.port, "GET", "/object_info", repeat=1)[0] * 1000)
            results["object_info_second_ms"].append(
                statistics.median(latency(lazy.port, "GET", "/object_info", repeat=20)) * 1000)
            results["system_stats_ms"].append(statistics.median(latency(lazy.port, "GET", "/system_stats")) * 1000)
            results["queue_ms"].append(statistics.median(latency(lazy.port, "GET", "/queue")) * 1000)
            body = json.dumps({"prompt": INVALID_PROMPT}).encode()  # validated, not queued
            results["post_prompt_ms"].append(statistics.median(latency(lazy.port, "POST", "/prompt", body)) * 1000)
            lazy.stop()
            background = Started(base, "background")
            results["ready_background_s"].append(background.ready_s)
            time.sleep(1.0)
            results["idle_rss_background_mb"].append(rss_tree_kb(background.proc.pid) / 1024)
            background.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    torch_median = statistics.median(results["import_torch_s"])
    print(f"comfy-serverless cold start, {args.runs} runs, {os.cpu_count()} CPUs "
          f"(ready = spawn to first 200 on /system_stats, polled every 5 ms)\n")
    print("| figure | min | median | max | unit |\n|---|---|---|---|---|")
    print(row("`python -c 'import torch'`", results["import_torch_s"], "s"))
    print(row("ready, --warmup lazy", results["ready_lazy_s"], "s"))
    print(row("ready, --warmup background (default)", results["ready_background_s"], "s"))
    print(row("idle RSS 1 s after ready, lazy", results["idle_rss_lazy_mb"], "MB"))
    print(row("RSS 1 s after ready, background (torch loading)", results["idle_rss_background_mb"], "MB"))
    print(row("GET /system_stats (p50 of 200)", results["system_stats_ms"], "ms"))
    print(row("GET /object_info, first call", results["object_info_first_ms"], "ms"))
    print(row("GET /object_info, later calls (p50)", results["object_info_second_ms"], "ms"))
    print(row("GET /queue (p50 of 200)", results["queue_ms"], "ms"))
    print(row("POST /prompt, validated (p50 of 200)", results["post_prompt_ms"], "ms"))
    ratio_lazy = statistics.median(results["ready_lazy_s"]) / torch_median
    ratio_bg = statistics.median(results["ready_background_s"]) / torch_median
    print(f"\nready / import torch (medians): lazy {ratio_lazy:.3f}, background {ratio_bg:.3f} (target <= 0.15)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "machine": machine, "results": results,
                                               "ratio_lazy": ratio_lazy, "ratio_background": ratio_bg}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
