"""Runs one API-format workflow to completion on a local comfy-serverless server and collects its images.

Job-based platforms (RunPod, queues) hand a worker one request and want one answer; ComfyUI's API is
asynchronous (POST /prompt, then WebSocket events, then /history). This module bridges the two:

    server = LocalServer().start()
    result = run_workflow(server.url, workflow, images=[InputImage("in.png", png_bytes)],
                          on_progress=print, timeout=600)
    result.images  # [OutputImage(filename, subfolder, type, data), ...]

The server is a child process (`python -m comfy_serverless serve` on a free loopback port): it keeps its own
event loop, signal handling and warm-up policy, and a crash in a node pack cannot take the worker down.
Standard library plus wsproto (already the server's dependency) for the WebSocket client.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import wsproto
import wsproto.events

from ..child_process import ends_with_parent

log = logging.getLogger("comfy_serverless.adapters")

LISTENING = re.compile(r"listening on http://[^ ]*:(\d+)")
DATA_URL_PREFIX = re.compile(r"^data:[^,]*;base64,")
HISTORY_WAIT_S = 5.0  # older servers sent execution_success before writing the history entry


class WorkflowError(Exception):
    """The workflow was refused or failed; `details` is what the server reported."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class InputImage:
    name: str
    data: bytes

    @classmethod
    def from_job(cls, index: int, item) -> "InputImage":
        """Accepts a base64 string (named image_<index>.png) or {"name": ..., "image": base64}."""
        if isinstance(item, str):
            name, encoded = f"image_{index}.png", item
        elif isinstance(item, dict) and isinstance(item.get("image"), str):
            name, encoded = str(item.get("name") or f"image_{index}.png"), item["image"]
        else:
            raise WorkflowError(f"images[{index}]: expected a base64 string or {{\"name\", \"image\"}}")
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise WorkflowError(f"images[{index}]: the name {name!r} must be a plain file name")
        try:
            data = base64.b64decode(DATA_URL_PREFIX.sub("", encoded), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WorkflowError(f"images[{index}]: not valid base64 ({exc})") from None
        return cls(name, data)


@dataclass
class OutputImage:
    filename: str
    subfolder: str
    type: str
    node_id: str
    data: bytes


@dataclass
class WorkflowResult:
    prompt_id: str
    images: list[OutputImage] = field(default_factory=list)
    seconds: float = 0.0


# -- the server process -----------------------------------------------------------------------------------
class LocalServer:
    """`comfy-serverless serve` on 127.0.0.1 and a free port; its log lines are passed to this stderr."""

    def __init__(self, extra_args: list[str] | None = None, start_timeout: float = 120.0):
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._port_found = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        # The command line wins over COMFY_* variables, so images that set COMFY_LISTEN=0.0.0.0 stay private.
        command = [sys.executable, "-m", "comfy_serverless", "serve", *self.extra_args,
                   "--listen", "127.0.0.1", "--port", "0"]
        self._port_found.clear()
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     preexec_fn=ends_with_parent())
        threading.Thread(target=self._pump_log, name="server-log", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self._port_found.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"comfy-serverless exited during start-up (status {self.proc.returncode})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"comfy-serverless did not listen within {self.start_timeout:.0f} s")
        return self

    def _pump_log(self) -> None:
        for line in self.proc.stdout:
            sys.stderr.write(line)
            if self.port is None or not self._port_found.is_set():
                match = LISTENING.search(line)
                if match:
                    self.port = int(match.group(1))
                    self._port_found.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Waits for /ready (the node catalogue is loaded and the queue has room)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if _request(self.url, "GET", "/ready", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"comfy-serverless was not ready within {timeout:.0f} s")

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the server drains: running prompts finish
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- HTTP helpers (standard library: the worker should not need requests) -------------------------------
def _request(base_url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 60) -> tuple[int, bytes]:
    parsed = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _json(base_url: str, method: str, path: str, payload=None, timeout: float = 60) -> tuple[int, object]:
    body = json.dumps(payload).encode() if payload is not None else None
    status, data = _request(base_url, method, path, body, {"Content-Type": "application/json"}, timeout)
    try:
        return status, json.loads(data or b"null")
    except ValueError:
        return status, data.decode(errors="replace")


def upload_image(base_url: str, image: InputImage) -> str:
    """POST /upload/image (overwriting a file of the same name); returns the name to use in LoadImage."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
        (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
         f"Content-Type: application/octet-stream\r\n\r\n").encode() + image.data + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    status, reply = _request(base_url, "POST", "/upload/image", b"".join(parts),
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status != 200:
        raise WorkflowError(f"uploading {image.name} failed: HTTP {status} {reply[:300]!r}")
    saved = json.loads(reply)
    return f"{saved['subfolder']}/{saved['name']}" if saved.get("subfolder") else saved["name"]


class WebSocketClient:
    """The few WebSocket client calls this module needs, on wsproto (sans-IO) and a blocking socket."""

    def __init__(self, host: str, port: int, target: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.messages: deque = deque()
        self._parts: list = []
        self.sock.sendall(self.conn.send(wsproto.events.Request(host=f"{host}:{port}", target=target)))
        self.accepted = False
        while not self.accepted:
            self._read(timeout)

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the WebSocket closed")
        self.conn.receive_data(data)
        for event in self.conn.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                self.accepted = True
            elif isinstance(event, wsproto.events.RejectConnection):
                raise ConnectionError(f"WebSocket refused: HTTP {event.status_code}")
            elif isinstance(event, (wsproto.events.TextMessage, wsproto.events.BytesMessage)):
                self._parts.append(event.data)
                if event.message_finished:
                    joined = "".join(self._parts) if isinstance(event.data, str) else b"".join(self._parts)
                    self.messages.append(joined)
                    self._parts = []
            elif isinstance(event, wsproto.events.Ping):
                self.sock.sendall(self.conn.send(event.response()))
            elif isinstance(event, wsproto.events.CloseConnection):
                raise ConnectionError("the WebSocket closed")

    def recv(self, timeout: float) -> str | bytes | None:
        """The next message, or None when none came within `timeout` seconds."""
        if not self.messages:
            try:
                self._read(timeout)
            except TimeoutError:
                return None
        return self.messages.popleft() if self.messages else None

    def close(self) -> None:
        try:
            self.sock.sendall(self.conn.send(wsproto.events.CloseConnection(code=1000)))
        except Exception:  # already closed or half-open: nothing to tell the server
            pass
        self.sock.close()


# -- one workflow ---------------------------------------------------------------------------------------
def run_workflow(base_url: str, workflow: dict, images: list[InputImage] = (),
                 on_progress: Callable[[dict], None] | None = None, timeout: float = 600.0,
                 image_types: tuple[str, ...] = ("output",)) -> WorkflowResult:
    """Uploads the images, queues the workflow, follows its WebSocket events, returns its images.

    `on_progress` receives {"node", "value", "max", "prompt_id"} for node progress and
    {"node", "status": "executing"} when a node starts. Raises WorkflowError on refusal, failure,
    interruption or timeout (the prompt is then interrupted).
    """
    if not isinstance(workflow, dict) or not workflow:
        raise WorkflowError("workflow must be a non-empty object in ComfyUI's API format")
    started = time.monotonic()
    for image in images:
        upload_image(base_url, image)

    client_id = uuid.uuid4().hex
    parsed = urllib.parse.urlsplit(base_url)
    ws = WebSocketClient(parsed.hostname, parsed.port, f"/ws?clientId={client_id}")
    try:
        status, reply = _json(base_url, "POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        if status != 200:
            details = reply if isinstance(reply, dict) else {"body": reply}
            error = details.get("error", {}) if isinstance(details, dict) else {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise WorkflowError(f"workflow refused (HTTP {status}): {message or reply}"
                                f"{_node_errors_summary(details)}", details)
        prompt_id = reply["prompt_id"]
        _follow(ws, prompt_id, on_progress, started + timeout, base_url)
    finally:
        ws.close()

    entry = wait_for_history(base_url, prompt_id)
    result = WorkflowResult(prompt_id)
    for node_id, outputs in entry.get("outputs", {}).items():
        for item in outputs.get("images", []) or []:
            if item.get("type") not in image_types:
                continue
            query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                            "type": item["type"]})
            view_status, data = _request(base_url, "GET", f"/view?{query}")
            if view_status != 200:
                raise WorkflowError(f"reading {item['filename']} failed: HTTP {view_status}")
            result.images.append(OutputImage(item["filename"], item.get("subfolder", ""), item["type"],
                                             str(node_id), data))
    result.seconds = time.monotonic() - started
    return result


def wait_for_history(base_url: str, prompt_id: str, wait: float = HISTORY_WAIT_S, interval: float = 0.05) -> dict:
    """The prompt's history entry, polled for up to `wait` seconds; WorkflowError when it never appears."""
    deadline = time.monotonic() + wait
    while True:
        status, history = _json(base_url, "GET", f"/history/{prompt_id}")
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if entry:
            return entry
        if time.monotonic() >= deadline:
            raise WorkflowError(f"prompt {prompt_id} finished but has no history entry (HTTP {status}, "
                                f"waited {wait:.0f} s)")
        time.sleep(interval)


def _node_errors_summary(details) -> str:
    """`; node 1 (KSampler): Required input is missing: model` for the first few validation errors."""
    node_errors = details.get("node_errors") if isinstance(details, dict) else None
    if not isinstance(node_errors, dict):
        return ""
    parts = []
    for node_id, info in list(node_errors.items())[:3]:
        for error in (info.get("errors") or [])[:2]:
            parts.append(f"node {node_id} ({info.get('class_type', '?')}): {error.get('message')}"
                         f"{': ' + str(error['details']) if error.get('details') else ''}")
    return "; " + "; ".join(parts) if parts else ""


def _follow(ws, prompt_id: str, on_progress, deadline: float, base_url: str) -> None:
    """Reads WebSocket events until the prompt ends; raises WorkflowError on failure or timeout."""
    while True:
        if time.monotonic() > deadline:
            _json(base_url, "POST", "/interrupt", {"prompt_id": prompt_id})
            raise WorkflowError(f"prompt {prompt_id} timed out and was interrupted")
        message = ws.recv(timeout=1.0)
        if not isinstance(message, str):  # None: nothing yet; bytes: a preview frame
            continue
        event = json.loads(message)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "progress" and on_progress:
            on_progress({"node": data.get("node"), "value": data.get("value"), "max": data.get("max"),
                         "prompt_id": prompt_id})
        elif kind == "executing" and data.get("prompt_id") == prompt_id:
            if data.get("node") is None:
                return
            if on_progress:
                on_progress({"node": data["node"], "status": "executing", "prompt_id": prompt_id})
        elif kind == "execution_success" and data.get("prompt_id") == prompt_id:
            return
        elif kind == "execution_error" and data.get("prompt_id") == prompt_id:
            raise WorkflowError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                f"{data.get('exception_message', '').strip()}",
                                {key: data.get(key) for key in ("node_id", "node_type", "exception_type",
                                                                "exception_message", "traceback")})
        elif kind == "execution_interrupted" and data.get("prompt_id") == prompt_id:
            raise WorkflowError(f"prompt {prompt_id} was interrupted")
