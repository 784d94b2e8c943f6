"""The RunPod worker (comfy_serverless/adapters/runpod_handler.py), run with the SDK's own local test mode.

`python -m comfy_serverless.adapters.runpod_handler --test_input '{"input": ...}'` is what RunPod documents for
testing a worker locally: the SDK runs the one job through the handler and exits 0 (or 1 on an error).
Progress updates go through the SDK's real `progress_update` to a webhook served by the test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import runpod  # noqa: F401  (in the test extra: a missing SDK is a failure, not a skip)
from PIL import Image

PACKS = Path(__file__).resolve().parent.parent / "packs"
HANDLER = [sys.executable, "-m", "comfy_serverless.adapters.runpod_handler"]


def png_bytes(color=(10, 200, 30), size=(16, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class Webhook:
    """Collects what the SDK POSTs to RUNPOD_WEBHOOK_POST_OUTPUT (progress updates)."""

    def __init__(self):
        self.posts: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append({"path": self.path, "body": json.loads(body)})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/job-done/$ID?gpu=none"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def worker_dir(tmp_path):
    (tmp_path / "custom_nodes").mkdir()
    shutil.copy2(PACKS / "engine_test_nodes.py", tmp_path / "custom_nodes" / "engine_test_nodes.py")
    return tmp_path


def run_local_test(worker_dir: Path, job_input: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*HANDLER, "--test_input", json.dumps({"input": job_input})], cwd=worker_dir,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=180)


def job_output(stdout_and_err: str) -> dict:
    """The SDK logs `Job result: {...}` (a Python repr) at the end of a local test."""
    import ast

    line = next(line for line in stdout_and_err.splitlines() if "Job result: " in line)
    return ast.literal_eval(line.split("Job result: ", 1)[1])["output"]


def test_local_test_mode_runs_workflow_with_input_image_and_streams_progress(worker_dir):
    webhook = Webhook()
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "runpod"}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "blue"}},
        "6": {"class_type": "Number", "inputs": {"value": 1.0}},
        "7": {"class_type": "SlowSteps", "inputs": {"value": ["6", 0], "steps": 6, "step_seconds": 0.15}},
        "8": {"class_type": "Record", "inputs": {"value": ["7", 0]}},
    }
    images = [{"name": "photo.png", "image": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()}]
    try:
        result = run_local_test(worker_dir, {"workflow": workflow, "images": images},
                                {"RUNPOD_WEBHOOK_POST_OUTPUT": webhook.url, "COMFY_RUNPOD_PROGRESS_INTERVAL": "0"})
    finally:
        webhook.close()
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Local testing complete" in log
    output = job_output(log)
    by_prefix = {image["filename"].split("_")[0]: image for image in output["images"]}
    assert set(by_prefix) == {"runpod", "blue"}
    assert all(image["type"] == "base64" for image in output["images"])
    inverted = Image.open(io.BytesIO(base64.b64decode(by_prefix["runpod"]["data"]))).convert("RGB")
    assert inverted.size == (16, 8)
    # ComfyUI's float round trip (x / 255, then * 255 truncated) may lose one step.
    assert all(abs(got - want) <= 1 for got, want in zip(inverted.getpixel((0, 0)), (245, 55, 225)))
    blue = Image.open(io.BytesIO(base64.b64decode(by_prefix["blue"]["data"]))).convert("RGB")
    assert blue.getpixel((0, 0)) == (0, 0, 255)
    assert (worker_dir / "input" / "photo.png").read_bytes() == png_bytes()

    # The SDK's progress_update posted IN_PROGRESS updates for the job, with the node's step counts.
    progress = [post["body"] for post in webhook.posts if post["body"].get("status") == "IN_PROGRESS"]
    assert progress, f"no progress update reached the webhook: {webhook.posts}"
    assert all(urllib.parse.urlsplit(post["path"]).path == "/job-done/local_test" for post in webhook.posts)
    steps = [update["output"] for update in progress if update["output"].get("node") == "7"]
    assert any(update.get("max") == 6 and update.get("value", 0) >= 1 for update in steps), progress


def test_local_test_mode_reports_refused_and_failing_workflows(worker_dir):
    refused = run_local_test(worker_dir, {"workflow": {
        "1": {"class_type": "Fail", "inputs": {}},
        "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}})
    assert refused.returncode == 1
    assert "workflow refused (HTTP 400): Prompt outputs failed validation; node 1 (Fail): Required input is " \
           "missing: value" in refused.stdout + refused.stderr

    failing = run_local_test(worker_dir, {"workflow": {
        "1": {"class_type": "Fail", "inputs": {"value": 1.0, "message": "boom"}},
        "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}})
    log = failing.stdout + failing.stderr
    assert failing.returncode == 1, log[-3000:]
    assert "node 1 (Fail) failed: boom" in log


# -- the handler called in-process (what the SDK does on RunPod), for what local mode cannot show --------
@pytest.fixture
def handler_module(worker_dir, monkeypatch):
    monkeypatch.setenv("COMFY_BASE_DIRECTORY", str(worker_dir))
    from comfy_serverless.adapters import runpod_handler

    yield runpod_handler
    if runpod_handler._server is not None:
        runpod_handler._server.stop()
        runpod_handler._server = None


def test_handler_rejects_bad_input_without_crashing(handler_module):
    assert "non-empty object" in handler_module.handler({"id": "j1", "input": {}})["error"]
    bad_image = handler_module.handler({"id": "j2", "input": {"workflow": {"1": {}}, "images": ["%%%"]}})
    assert "images[0]: not valid base64" in bad_image["error"]
    bad_name = handler_module.handler({"id": "j3", "input": {"workflow": {"1": {}},
                                                              "images": [{"name": "../x.png", "image": ""}]}})
    assert "plain file name" in bad_name["error"]


def test_handler_uploads_to_a_bucket_when_one_is_configured(handler_module, monkeypatch):
    from runpod.serverless.utils import rp_upload

    uploaded = []

    def fake_upload(job_id, path, result_index=0, results_list=None, bucket_name=None):
        uploaded.append((job_id, Path(path).read_bytes()[:8], bucket_name))
        return f"https://bucket.example/{job_id}/{Path(path).name}"

    monkeypatch.setattr(rp_upload, "upload_image", fake_upload)
    for name in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "set")
    monkeypatch.setenv("COMFY_RUNPOD_BUCKET_NAME", "renders")
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}}}
    result = handler_module.handler({"id": "job-42", "input": {"workflow": workflow}})
    assert "error" not in result, result
    assert [image["type"] for image in result["images"]] == ["url", "url"]
    assert all(image["url"].startswith("https://bucket.example/job-42/") for image in result["images"])
    assert uploaded == [("job-42", b"\x89PNG\r\n\x1a\n", "renders")] * 2


def test_handler_times_out_and_interrupts(handler_module):
    workflow = {"1": {"class_type": "Number", "inputs": {"value": 1.0}},
                "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 200, "step_seconds": 0.05}},
                "3": {"class_type": "Record", "inputs": {"value": ["2", 0]}}}
    result = handler_module.handler({"id": "slow", "input": {"workflow": workflow, "timeout": 1.5}})
    assert "timed out and was interrupted" in result["error"]
    # The interrupted prompt does not block the next job.
    quick = {"1": {"class_type": "Number", "inputs": {"value": 2.0}},
             "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    assert handler_module.handler({"id": "next", "input": {"workflow": quick, "timeout": 30}})["images"] == []
