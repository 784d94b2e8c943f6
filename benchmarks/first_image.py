"""Time to first image (figures 4-6 of docs/benchmarks.md).

The default txt2img workflow (docs/comfy-api-contract.md §4.1) at 256x256, 4 steps, cfg 7, euler / normal,
batch 1, on a full-size SD1.5-architecture checkpoint with random weights made by
`comfy-serverless make-test-checkpoint` (about 2.1 GB, cached under benchmarks/.cache/). For each run a fresh
server is spawned as a user starts it; the cold time runs from the spawn to the PNG file on disk. Then the same
workflow with a new seed on the running server gives the warm time. Peak RSS is the server's VmHWM.

    .venv/bin/python benchmarks/first_image.py [--runs 3] [--size 256] [--steps 4] [--prepared yes|no|both]
        [--json out.json]

--prepared yes (the default) runs `prepare` as a build step (not timed, like `snapshot`; the prepared weights are
kept under benchmarks/.cache/prepared); both alternates runs with and without them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import websocket  # websocket-client (a test dependency)

from coldstart import free_port  # run as a script: benchmarks/ is on sys.path
from machine import describe as describe_machine
from machine import precision_line

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
CACHE = Path(__file__).resolve().parent / ".cache"
CHECKPOINT = "sd15-random-full.safetensors"
# The server's log lines that say which dtype each model computes in (models/precision.py, model_cache.py).
MEASURED = re.compile(r"precision: fp32 ([\d.]+) ms, bf16 ([\d.]+) ms \(ratio ([\d.]+)\)")
DECIDED = re.compile(r"precision: default compute dtype (\w+) \((.*)\)")
PREPARED_USED = "using prepared weights"
LOADED = re.compile(r"loaded \S+ (UNet|text encoder|VAE) \((\w+)\)")


def workflow(seed: int, size: int, steps: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "masterpiece best quality girl", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "bad hands", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def ensure_checkpoint() -> Path:
    path = CACHE / CHECKPOINT
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        print(f"making {path} (random weights, once) ...", flush=True)
        subprocess.run([str(VENV_BIN / "comfy-serverless"), "make-test-checkpoint", "--arch", "sd15", "--size", "full",
                        str(path)], check=True)
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def chosen_precision(log: str) -> str:
    """e.g. "UNet bfloat16, text encoder bfloat16, VAE bfloat16 (measured: fp32 9.1 ms, bf16 3.9 ms, ratio 0.43)"."""
    models = ", ".join(f"{what} {dtype}" for what, dtype in dict(LOADED.findall(log)).items()) or "unknown"
    measured, decided = MEASURED.search(log), DECIDED.search(log)
    how = decided[2] if decided else "set by flags"
    if measured:
        how += f"; measured: fp32 {measured[1]} ms, bf16 {measured[2]} ms, ratio {measured[3]}"
    weights = "prepared weights" if PREPARED_USED in log else "converted at load"
    return f"{models} ({how}); {weights}"


def http_json(url: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=600) as response:
        return json.loads(response.read())


def run_prompt(port: int, prompt: dict, spawned: float) -> dict:
    """Queues a prompt and follows it over the WebSocket; returns client-side event times (s since spawn)."""
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client_id}", timeout=1200)
    posted = time.perf_counter()
    queued = http_json(f"http://127.0.0.1:{port}/prompt", {"prompt": prompt, "client_id": client_id})
    times = {"posted": posted - spawned, "node_start": {}, "steps": []}
    while True:
        frame = ws.recv()
        if isinstance(frame, bytes):
            continue
        message = json.loads(frame)
        now = time.perf_counter() - spawned
        data = message["data"]
        if message["type"] == "executing" and data.get("prompt_id") == queued["prompt_id"]:
            if data["node"] is None:
                times["done"] = now
                break
            times["node_start"].setdefault(data["node"], now)
        elif message["type"] == "progress":
            times["steps"].append(now)
        elif message["type"] == "execution_error":
            raise RuntimeError(data.get("exception_message"))
    ws.close()
    return times


def wait_for_file(folder: Path, since: float, spawned: float, timeout: float = 1200) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if any(p.stat().st_mtime >= since for p in folder.glob("bench_*.png")):
            return time.perf_counter() - spawned
        time.sleep(0.01)
    raise TimeoutError("no image written")


class HealthProbe:
    """Polls GET /health every 50 ms on a kept-alive connection while generation runs (figure 7)."""

    def __init__(self, port: int):
        self.port = port
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            self.latencies.append(time.perf_counter() - started)
            self._stop.wait(0.05)
        conn.close()

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def one_run(checkpoint: Path, size: int, steps: int, seed: int, prepared: bool = True) -> dict:
    base = Path(tempfile.mkdtemp(prefix="first-image-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT).symlink_to(checkpoint)
    # COMFY_PREPARED_DIR: the prepared weights outlive the run's base folder (made once per checkpoint and CPU).
    env = {**os.environ, "COMFY_PREPARED_DIR": str(CACHE / ("prepared" if prepared else "not-prepared"))}
    quiet = ["--base-directory", str(base), "--verbose", "WARNING"]
    subprocess.run([str(VENV_BIN / "comfy-serverless"), "snapshot", *quiet], check=True, cwd=base, env=env)
    if prepared:  # build steps, as an image build would run them
        subprocess.run([str(VENV_BIN / "python"), "-m", "comfy_serverless.prepare_command", *quiet,
                        "--pack-size", str(size)], check=True, cwd=base, env=env)  # packed for the size served
    port = free_port()
    spawned = time.perf_counter()
    wall_start = time.time()
    log_path = base / "server.log"  # read back for the chosen precision
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(VENV_BIN / "comfy-serverless"), "serve", "--port", str(port),
                                 "--base-directory", str(base), "--dont-print-server"], cwd=base,
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=1).read()
                ready = time.perf_counter() - spawned
                break
            except OSError:
                time.sleep(0.005)
        probe = HealthProbe(port)
        cold = run_prompt(port, workflow(seed, size, steps), spawned)
        image_at = wait_for_file(base / "output", wall_start, spawned)
        stages = http_json(f"http://127.0.0.1:{port}/system_stats")["comfy_serverless"]["startup"]
        warm_start = time.perf_counter()
        warm = run_prompt(port, workflow(seed + 1, size, steps), spawned)
        health = probe.stop()
        warm_s = warm["done"] - (warm_start - spawned)
        step_times = [b - a for a, b in zip(warm["steps"], warm["steps"][1:])]
        return {"ready_s": ready, "cold_image_s": image_at, "warm_image_s": warm_s,
                "warm_step_s": statistics.median(step_times) if step_times else None,
                "peak_rss_mb": peak_rss_mb(proc.pid), "server_stages": stages,
                "health_p50_ms": percentile(health, 0.5) * 1000, "health_p99_ms": percentile(health, 0.99) * 1000,
                "health_max_ms": max(health) * 1000,
                "cold_node_start": cold["node_start"], "cold_done": cold["done"], "cold_steps": cold["steps"],
                "precision": chosen_precision(log_path.read_text(errors="replace"))}
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(base, ignore_errors=True)


def split(run: dict) -> list[tuple[str, float]]:
    """Cold run split by stage, seconds since spawn (node starts as the client saw them)."""
    s, n = run["server_stages"], run["cold_node_start"]
    rows = [("server ready (first 200)", run["ready_s"])]
    if "packs_imported" in s:
        rows.append(("torch + packs imported (server clock)", s["packs_imported"]))
    loaded = [v for k, v in s.items() if k.startswith("model_loaded:")]
    if loaded:
        rows.append(("checkpoint loaded (server clock)", min(loaded)))
    for label, node in (("text encoding started", "6"), ("sampling started", "3"), ("decode started", "8"),
                        ("save started", "9")):
        if node in n:
            rows.append((label, n[node]))
        if node == "3" and run.get("cold_steps"):  # the first step against the others: what the cold path adds
            steps = run["cold_steps"]
            rows.append(("first step done", steps[0]))
            if len(steps) > 1:
                rows.append((f"last step done ({len(steps) - 1} more)", steps[-1]))
    rows.append(("image file written", run["cold_image_s"]))
    return rows


def compare_prepared(checkpoint: Path, args) -> int:
    """Alternating runs without and with prepared weights: what the build step buys, by stage."""
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.runs):
        for prepared in (False, True):
            runs[prepared].append(one_run(checkpoint, args.size, args.steps, seed=1000 + i, prepared=prepared))
            print(f"run {i + 1} prepared={prepared}: cold {runs[prepared][-1]['cold_image_s']:.2f} s", flush=True)
    print(f"\n{describe_machine()}\n\n| figure | converted at load | prepared | ratio |\n|---|---|---|---|")
    rows = [("cold: spawn to image file", lambda r: r["cold_image_s"]),
            ("cold: prompt sent to done", lambda r: r["cold_done"] - r["ready_s"]),
            ("warm: POST to done", lambda r: r["warm_image_s"]), ("peak RSS (MB)", lambda r: r["peak_rss_mb"])]
    for label, value in rows:
        plain, fast = (statistics.median(value(r) for r in runs[p]) for p in (False, True))
        print(f"| {label} | {plain:.2f} | {fast:.2f} | {fast / plain:.2f} |")
    for prepared in (False, True):
        median_run = sorted(runs[prepared], key=lambda r: r["cold_image_s"])[len(runs[prepared]) // 2]
        stages = ", ".join(f"{label} {at:.2f}" for label, at in split(median_run))
        print(f"\ncold split, prepared={prepared}: {stages}")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prepared", choices=("yes", "no", "both"), default="yes")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(describe_machine(), flush=True)  # the figures below hold for this CPU only
    print(precision_line(str(VENV_BIN / "python")), flush=True)
    checkpoint = ensure_checkpoint()
    if args.prepared == "both":
        return compare_prepared(checkpoint, args)
    runs = []
    for i in range(args.runs):
        runs.append(one_run(checkpoint, args.size, args.steps, seed=1000 + i, prepared=args.prepared == "yes"))
        print(f"run {i + 1}: cold {runs[-1]['cold_image_s']:.2f} s, warm {runs[-1]['warm_image_s']:.2f} s", flush=True)

    def stat(key):
        values = [r[key] for r in runs if r[key] is not None]
        return min(values), statistics.median(values), max(values)

    print(f"\nfirst image, {args.size}x{args.size}, {args.steps} steps, euler/normal, cfg 7, full-size SD1.5 random "
          f"weights, {args.runs} runs")
    for precision in dict.fromkeys(r["precision"] for r in runs):  # one line unless runs differed
        print(f"precision: {precision}")
    print()
    print("| figure | min | median | max |\n|---|---|---|---|")
    for label, key, unit in (("cold: spawn to image file", "cold_image_s", "s"),
                             ("warm: POST to done", "warm_image_s", "s"),
                             ("warm: per step", "warm_step_s", "s"), ("peak RSS", "peak_rss_mb", "MB"),
                             ("GET /health during generation, p50", "health_p50_ms", "ms"),
                             ("GET /health during generation, p99", "health_p99_ms", "ms"),
                             ("GET /health during generation, max", "health_max_ms", "ms")):
        if not any(r[key] is not None for r in runs):  # e.g. no per-step time with --steps 1
            print(f"| {label} ({unit}) | n/a | n/a | n/a |")
            continue
        lo, mid, hi = stat(key)
        print(f"| {label} ({unit}) | {lo:.2f} | {mid:.2f} | {hi:.2f} |")
    median_run = sorted(runs, key=lambda r: r["cold_image_s"])[len(runs) // 2]
    print("\ncold run split (median run), seconds since spawn:\n\n| stage | at |\n|---|---|")
    for label, value in split(median_run):
        print(f"| {label} | {value:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
