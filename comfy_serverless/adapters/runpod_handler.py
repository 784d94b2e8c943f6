"""RunPod serverless worker: each job runs one ComfyUI API workflow on a local comfy-serverless server.

Job input:
    {"workflow": {...API format...},
     "images": ["<base64>", {"name": "photo.png", "image": "<base64 or data URL>"}, ...],   (optional)
     "timeout": 600}                                                                          (optional)
Bare base64 strings are saved as image_0.png, image_1.png, ... in the input folder, for LoadImage.

Output:
    {"prompt_id": ..., "seconds": ..., "images": [{"filename", "subfolder", "node_id", "type": "base64",
                                                   "data": "<base64 PNG>"}, ...]}
With a bucket configured (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY; optional
COMFY_RUNPOD_BUCKET_NAME) each image is uploaded instead and comes back as {"type": "url", "url": ...}.
Failures come back as {"error": message, "details": {...}}, which RunPod marks as FAILED.

Node progress is sent with the SDK's `progress_update` (at most every COMFY_RUNPOD_PROGRESS_INTERVAL s,
default 0.5, and at every node change). The server starts before the SDK asks for the first job, so its
warm-up overlaps RunPod's; configure it with COMFY_* variables (COMFY_BASE_DIRECTORY, COMFY_WARMUP, ...).

    python -m comfy_serverless.adapters.runpod_handler                      # on RunPod
    python -m comfy_serverless.adapters.runpod_handler --test_input '{"input": {"workflow": {...}}}'
"""

from __future__ import annotations

import atexit
import base64
import logging
import os
import tempfile
import threading
import time

from .workflow_runner import InputImage, LocalServer, WorkflowError, run_workflow

log = logging.getLogger("comfy_serverless.adapters.runpod")

DEFAULT_TIMEOUT_S = 600.0

_server: LocalServer | None = None
_server_lock = threading.Lock()


def server() -> LocalServer:
    """The worker's one server process, started on first use and stopped (drained) at exit."""
    global _server
    with _server_lock:
        if _server is None or _server.proc is None or _server.proc.poll() is not None:
            _server = LocalServer().start()
            atexit.register(_server.stop)
        return _server


def bucket_configured() -> bool:
    return all(os.environ.get(name) for name in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID",
                                                 "BUCKET_SECRET_ACCESS_KEY"))


def on_runpod() -> bool:
    """Progress updates go to RunPod's job webhook; without one (local runs) they are only logged."""
    return bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))


class ProgressReporter:
    """Forwards node progress to RunPod, throttled so that a 1000-step node does not send 1000 requests."""

    def __init__(self, job: dict, interval: float):
        self.job = job
        self.interval = interval
        self.last_sent = 0.0
        self.last_node = None

    def __call__(self, update: dict) -> None:
        now = time.monotonic()
        node_changed = update.get("node") != self.last_node
        finished_node = update.get("max") is not None and update.get("value") == update.get("max")
        if not (node_changed or finished_node or now - self.last_sent >= self.interval):
            return
        self.last_sent, self.last_node = now, update.get("node")
        log.info("progress %s", update)
        if on_runpod():
            import runpod

            runpod.serverless.progress_update(self.job, update)


def _image_result(job_id: str, image) -> dict:
    described = {"filename": image.filename, "subfolder": image.subfolder, "node_id": image.node_id}
    if not bucket_configured():
        return {**described, "type": "base64", "data": base64.b64encode(image.data).decode()}
    from runpod.serverless.utils import rp_upload

    suffix = os.path.splitext(image.filename)[1] or ".png"
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:  # the SDK uploads from a path
        handle.write(image.data)
        handle.flush()
        url = rp_upload.upload_image(job_id, handle.name, bucket_name=os.environ.get("COMFY_RUNPOD_BUCKET_NAME"))
    return {**described, "type": "url", "url": url}


def handler(job: dict) -> dict:
    """The RunPod handler: job["input"] -> output dict (or {"error": ...})."""
    job_input = job.get("input") or {}
    try:
        workflow = job_input.get("workflow", job_input.get("prompt"))
        images = [InputImage.from_job(i, item) for i, item in enumerate(job_input.get("images") or [])]
        timeout = float(job_input.get("timeout") or os.environ.get("COMFY_RUNPOD_TIMEOUT") or DEFAULT_TIMEOUT_S)
        interval = float(os.environ.get("COMFY_RUNPOD_PROGRESS_INTERVAL", "0.5"))
        local = server()
        local.wait_ready()
        result = run_workflow(local.url, workflow, images, ProgressReporter(job, interval), timeout)
        return {"prompt_id": result.prompt_id, "seconds": round(result.seconds, 3),
                "images": [_image_result(str(job.get("id", "local")), image) for image in result.images]}
    except WorkflowError as exc:
        log.warning("job %s failed: %s", job.get("id"), exc)
        return {"error": str(exc), "details": exc.details}


def main() -> None:
    import runpod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server()  # start now: the server's warm-up overlaps the SDK's start and the first job's delivery
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
