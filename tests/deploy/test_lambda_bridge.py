"""comfy_serverless/adapters/lambda_bridge.py: the ComfyUI API passed through, and POST /run in one request."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 65280}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bridge"}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    base = tmp_path_factory.mktemp("bridge")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comfy_serverless.adapters.lambda_bridge", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=base, env={**os.environ, "COMFY_WARMUP": "lazy"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    yield {"url": url, "proc": proc, "base": base}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_comfyui_api_passes_through(bridge):
    url = bridge["url"]
    stats = requests.get(f"{url}/system_stats", timeout=10)
    assert stats.status_code == 200 and "comfy_serverless" in stats.json()
    refused = requests.post(f"{url}/prompt", json={"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}, timeout=10)
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_prompt"
    queued = requests.post(f"{url}/prompt", json={"prompt": WORKFLOW}, timeout=10)
    assert queued.status_code == 200 and "prompt_id" in queued.json()
    assert requests.get(f"{url}/object_info/SaveImage", timeout=10).json()["SaveImage"]["output_node"] is True


def test_run_answers_with_the_images_in_the_same_request(bridge):
    reply = requests.post(f"{bridge['url']}/run", json={"workflow": WORKFLOW}, timeout=120)
    assert reply.status_code == 200, reply.text
    images = reply.json()["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("bridge_")
    assert base64.b64decode(images[0]["data"]).startswith(b"\x89PNG")
    assert (bridge["base"] / "output" / images[0]["filename"]).exists()


def test_run_reports_bad_requests_as_400(bridge):
    url = bridge["url"]
    assert requests.post(f"{url}/run", data=b"not json", timeout=10).status_code == 400
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    invalid = requests.post(f"{url}/run", json={"workflow": workflow}, timeout=30)
    assert invalid.status_code == 400 and "Required input is missing" in invalid.json()["error"]


def test_sigterm_stops_bridge_and_server(bridge):
    proc = bridge["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    log = proc.stdout.read()
    assert "stopped" in log  # the server drained and logged its stop
