"""ComfyUI as a second backend: what it costs the front (README "ComfyUI as a second backend").

With the CI stand-in ComfyUI (tests/backend/standin_comfyui: comfy-serverless started with ComfyUI's arguments,
loading tests/backend/backend_pack), or a real ComfyUI checkout with --comfyui, prints medians of:
  1. time to first answer (spawn -> first 200 from /health), native-only vs with a backend configured, and the
     backend's boot time as the front sees it (/system_stats);
  2. GET /object_info with the union catalogue vs the native one;
  3. a small backend prompt (POST /prompt -> final `executing` on the WebSocket) through the front vs sent
     directly to the same ComfyUI process (the front's child, on its loopback port): the front's overhead.
     With a real ComfyUI the prompt is EmptyImage -> LTXVPreprocess -> PreviewImage (no models; LTXVPreprocess
     is a node this server does not have), at two image sizes.

    .venv/bin/python benchmarks/backend.py [--runs 7] [--comfyui DIR --comfyui-python PATH --comfyui-args --cpu]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import websocket

from machine import describe as describe_machine  # run as a script: benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
STANDIN = REPO / "tests" / "backend"
SMALL_PROMPT = {"1": {"class_type": "PrimitiveFloat", "inputs": {"value": 2.0}},
                "2": {"class_type": "BackendTriple", "inputs": {"value": ["1", 0]}},
                "3": {"class_type": "BackendSteps", "inputs": {"value": ["2", 0], "steps": 5, "step_seconds": 0.01,
                                                                "preview": False}},
                "4": {"class_type": "BackendShow", "inputs": {"value": ["3", 0]}}}
REAL_PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
               "2": {"class_type": "LTXVPreprocess", "inputs": {"image": ["1", 0], "img_compression": 35}},
               "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post(port: int, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, data
        return json.loads(data)
    finally:
        conn.close()


def spawn(command: list[str], port: int, cwd: Path) -> tuple[subprocess.Popen, float]:
    """Starts a server and returns it with the seconds to its first 200 from /health."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(cwd))
    while True:
        try:
            if get(port, "/health")[0] == 200:
                return proc, time.perf_counter() - started
        except OSError:
            pass
        if proc.poll() is not None or time.perf_counter() - started > 60:
            raise RuntimeError(f"{command} did not answer")
        time.sleep(0.002)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(base: Path, port: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "comfy_serverless", "serve", "--port", str(port), "--base-directory", str(base),
            "--dont-print-server", "--verbose", "WARNING", *extra]


def small_prompt(real: bool, size: int) -> dict:
    """The stand-in's pack prompt (`size` steps of 10 ms), or REAL_PROMPT at size x size; never cached."""
    unique = time.perf_counter_ns() % 1000
    prompt = json.loads(json.dumps(REAL_PROMPT if real else SMALL_PROMPT))
    if real:
        prompt["1"]["inputs"].update(width=size, height=size, color=unique)
    else:
        prompt["1"]["inputs"]["value"] = float(unique)
        prompt["3"]["inputs"].update(steps=size, step_seconds=0.01)
    return prompt


def run_prompt(port: int, prompt: dict) -> float:
    """POST /prompt -> the final `executing` (node None) on this client's socket, in seconds."""
    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client}", timeout=60)
    try:
        started = time.perf_counter()
        prompt_id = post(port, "/prompt", {"prompt": prompt, "client_id": client})["prompt_id"]
        while True:
            frame = ws.recv()
            if isinstance(frame, str):
                message = json.loads(frame)
                if (message["type"] == "executing" and message["data"].get("node") is None
                        and message["data"].get("prompt_id") == prompt_id):
                    return time.perf_counter() - started
    finally:
        ws.close()


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def wait_backend_up(port: int, limit_s: float = 300) -> float:
    """The backend's boot seconds once the front reports it up."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        state = json.loads(get(port, "/system_stats")[1])["comfy_serverless"]["backend"]
        if state["state"] == "up":
            return state["boot_seconds"]
        if state["state"] == "failed":
            raise RuntimeError(f"the backend did not start: {state['last_error']}")
        time.sleep(0.1)
    raise RuntimeError("the backend was not up in time")


def child_port(port: int) -> int:
    """The loopback port of the front's ComfyUI child, from its command line (Linux /proc)."""
    pid = json.loads(get(port, "/system_stats")[1])["comfy_serverless"]["backend"]["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--port") + 1])


def prepare(root: Path, comfyui: Path | None, comfyui_python: str,
            comfyui_args: str = "") -> tuple[Path, Path, Path, list[str]]:
    if comfyui is None:
        comfyui = root / "ComfyUI"
        (comfyui / "custom_nodes").mkdir(parents=True)
        for name in ("main.py", "comfyui_version.py"):
            shutil.copy2(STANDIN / "standin_comfyui" / name, comfyui / name)
        shutil.copytree(STANDIN / "backend_pack", comfyui / "custom_nodes" / "backend_pack")
        subprocess.run([PYTHON, "-m", "comfy_serverless", "snapshot", "--base-directory", str(comfyui)], check=True,
                       capture_output=True)
    flags = ["--comfyui", str(comfyui), "--comfyui-python", comfyui_python, f"--comfyui-args={comfyui_args}"]
    native, with_backend = root / "native", root / "with-backend"
    for base, extra in ((native, []), (with_backend, flags)):
        base.mkdir()
        subprocess.run([PYTHON, "-m", "comfy_serverless", "snapshot", "--base-directory", str(base), *extra],
                       check=True, capture_output=True)
    return comfyui, native, with_backend, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--comfyui", type=Path, help="a real ComfyUI checkout (default: the CI stand-in)")
    parser.add_argument("--comfyui-python", default=PYTHON)
    parser.add_argument("--comfyui-args", default="", help="passed to ComfyUI (e.g. --cpu)")
    args = parser.parse_args()
    real = args.comfyui is not None
    print(describe_machine(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    try:
        comfyui, native, with_backend, flags = prepare(root, args.comfyui, args.comfyui_python, args.comfyui_args)
        boots: list[float] = []
        first: dict[str, list[float]] = {"native only": [], "native only (lazy)": [],
                                         "with backend (background)": [], "with backend (lazy)": []}
        for _ in range(args.runs):  # alternated, so both see the same machine load
            for label, base, extra in (("native only", native, ["--warmup", "background"]),
                                       ("native only (lazy)", native, ["--warmup", "lazy"]),
                                       ("with backend (background)", with_backend, [*flags, "--warmup", "background"]),
                                       ("with backend (lazy)", with_backend, [*flags, "--warmup", "lazy"])):
                port = free_port()
                proc, seconds = spawn(serve(base, port, *extra), port, base)
                first[label].append(seconds)
                if label == "with backend (background)":
                    boots.append(wait_backend_up(port))
                stop(proc)
        print("time to first answer (spawn -> /health 200):")
        for label, values in first.items():
            print(f"  {label:28s} {median_ms(values)}")
        for label, reference in (("with backend (background)", "native only"),
                                 ("with backend (lazy)", "native only (lazy)")):
            change = 100 * (statistics.median(first[label]) / statistics.median(first[reference]) - 1)
            print(f"  {label}: {change:+.1f} % vs {reference}")
        print(f"  backend boot (spawn of ComfyUI -> its first /system_stats, as the front sees it) "
              f"{statistics.median(boots):.2f} s (min {min(boots):.2f}, max {max(boots):.2f})")

        print("GET /object_info (after start):")
        for label, base, extra in (("native catalogue", native, []), ("union catalogue", with_backend, flags)):
            port = free_port()
            proc, _ = spawn(serve(base, port, *extra, "--warmup", "lazy"), port, base)
            times, size = [], 0
            for _ in range(args.runs * 3):
                started = time.perf_counter()
                status, body = get(port, "/object_info")
                times.append(time.perf_counter() - started)
                size = len(body)
            stop(proc)
            print(f"  {label:28s} {median_ms(times)}  {size / 1024:.0f} KiB, {len(json.loads(body))} nodes")

        print("backend prompts (POST -> final executing on the client's socket), median of alternating runs:")
        port = free_port()
        front, _ = spawn(serve(with_backend, port, *flags, "--warmup", "background"), port, with_backend)
        wait_backend_up(port)
        direct_port = child_port(port)
        run_prompt(port, small_prompt(real, 64)), run_prompt(direct_port, small_prompt(real, 64))  # warm both
        for size, repeats in (((64, args.runs * 3), (1024, args.runs)) if real else
                              ((5, args.runs * 3), (100, args.runs))):
            through, alone = [], []
            for _ in range(repeats):
                through.append(run_prompt(port, small_prompt(real, size)))
                alone.append(run_prompt(direct_port, small_prompt(real, size)))
            print(f" {size}x{size} image:" if real else f" {size} steps of 10 ms:")
            print(f"  {'backend alone':28s} {median_ms(alone)}")
            print(f"  {'through the front':28s} {median_ms(through)}")
            overhead = statistics.median(through) - statistics.median(alone)
            print(f"  front overhead: {overhead * 1000:.1f} ms = {100 * overhead / statistics.median(alone):.1f} % of "
                  "the backend's own time")
            paired = statistics.median(t - a for t, a in zip(through, alone))  # each run next to its partner
            print(f"  median of paired differences: {paired * 1000:.1f} ms = "
                  f"{100 * paired / statistics.median(alone):.1f} %")
        stop(front)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
