"""AWS Lambda front: the unchanged ComfyUI API, plus `POST /run`, which runs a workflow within one request.

Lambda freezes a function's environment between invocations, so a prompt queued by `POST /prompt` only
advances while some request is in flight, and Lambda function URLs carry no WebSocket. `POST /run` keeps the
invocation open until the workflow is done:

    POST /run  {"workflow": {...API format...}, "images": [...], "timeout": 600}      (as the RunPod worker)
    -> 200 {"prompt_id", "seconds", "images": [{"filename", "subfolder", "node_id", "type": "base64", "data"}]}
    -> 400 / 500 {"error": message, "details": {...}}

Every other request is passed to the comfy-serverless server behind it, unchanged. The AWS Lambda Web Adapter
forwards invocations here (AWS_LWA_PORT, default 8080 as in the image); outside Lambda it is a plain
HTTP server:  python -m comfy_serverless.adapters.lambda_bridge [--port 8080]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .workflow_runner import InputImage, LocalServer, WorkflowError, run_workflow

log = logging.getLogger("comfy_serverless.adapters.lambda")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
DEFAULT_TIMEOUT_S = 600.0


def run_request(base_url: str, body: bytes) -> tuple[int, dict]:
    try:
        job_input = json.loads(body or b"{}")
        if not isinstance(job_input, dict):
            raise ValueError("the body must be a JSON object")
    except ValueError as exc:
        return 400, {"error": f"invalid JSON body: {exc}"}
    try:
        images = [InputImage.from_job(i, item) for i, item in enumerate(job_input.get("images") or [])]
        timeout = float(job_input.get("timeout") or DEFAULT_TIMEOUT_S)
        result = run_workflow(base_url, job_input.get("workflow", job_input.get("prompt")), images,
                              timeout=timeout)
    except WorkflowError as exc:
        refused = str(exc).startswith(("workflow refused", "images[", "workflow must"))
        return (400 if refused else 500), {"error": str(exc), "details": exc.details}
    return 200, {"prompt_id": result.prompt_id, "seconds": round(result.seconds, 3),
                 "images": [{"filename": image.filename, "subfolder": image.subfolder, "node_id": image.node_id,
                             "type": "base64", "data": base64.b64encode(image.data).decode()}
                            for image in result.images]}


def make_handler(server: LocalServer):
    class Bridge(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _proxy(self) -> None:
            body = self._body()
            if self.command == "POST" and self.path.split("?")[0] == "/run":
                status, payload = run_request(server.url, body)
                self._reply(status, json.dumps(payload).encode(), [("Content-Type", "application/json")])
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEFAULT_TIMEOUT_S)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                self._reply(response.status, data, kept)
            except OSError as exc:
                self._reply(502, json.dumps({"error": f"comfy-serverless is not answering: {exc}"}).encode(),
                            [("Content-Type", "application/json")])
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _proxy

        def log_message(self, fmt, *args):
            log.debug("%s %s", self.address_string(), fmt % args)

    return Bridge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="comfy-serverless behind the AWS Lambda Web Adapter")
    parser.add_argument("--port", type=int, default=int(os.environ.get("AWS_LWA_PORT", "8080")))
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = LocalServer().start()
    bridge = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    bridge.daemon_threads = True
    log.info("lambda bridge on http://%s:%d -> %s", args.host, args.port, server.url)

    def stop(signum, frame):
        # Lambda sends SIGTERM at shutdown: let the server drain, then stop answering.
        threading.Thread(target=lambda: (server.stop(), bridge.shutdown()), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        bridge.serve_forever()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
