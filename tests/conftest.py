"""Fixtures that start the real server as a subprocess, the way a user starts it, and talk HTTP/WS to it."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
import websocket

REPO = Path(__file__).resolve().parent.parent
# Inductor's cache key leaves out ATen's CPU capability: a kernel compiled under ATEN_CPU_CAPABILITY=avx2 aborted a
# later uncapped run on this machine (TorchCompileModel tests). One cache per capability, for this run and the
# servers it starts.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))
PACKS = Path(__file__).resolve().parent / "packs"
COMMAND = [sys.executable, "-m", "comfy_serverless"]
LISTENING = re.compile(r"listening on http://[^ ]*:(\d+)")


@contextlib.contextmanager
def server_context(**flags):
    """Runs the block as if inside a server with these settings (its own folders, interrupt, model cache)."""
    from comfy_serverless import context
    from comfy_serverless.settings import default_settings

    own = context.ServerContext(default_settings(**flags))
    token = own.activate()
    try:
        yield own
    finally:
        context.deactivate(token)


class Server:
    """A running `comfy-serverless serve` process on a free port, with helpers for tests."""

    def __init__(self, base: Path, args=(), env=None, packs=("engine_test_nodes.py",), wait_ready=True,
                 launcher=()):
        self.base = base
        custom = base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for name in packs:  # a file or a package folder under tests/packs, copied to custom_nodes/<its name>
            source, target = PACKS / name, custom / Path(name).name
            if source.is_dir():  # copytree copies with copy2 too, keeping mtimes
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)  # keeps mtimes: the catalogue fingerprint uses them
        self.log_path = base / f"server-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "w")
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*launcher, *COMMAND, "serve", "--port", "0", "--base-directory", str(base), "--warmup", "lazy", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=str(base))
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()
        if wait_ready:
            self.wait_ready()

    def _wait_for_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_text())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http.get(self.url + "/ready").status_code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"server never became ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def rss_mb(self) -> float:
        """The server's resident memory, from its own /proc entry (memory bounds are asserted on this)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for pid {self.proc.pid}")

    def get(self, path, **kw):
        return self.http.get(self.url + path, **kw)

    def post(self, path, payload=None, **kw):
        if payload is not None:
            kw["data"] = json.dumps(payload)
        return self.http.post(self.url + path, **kw)

    def queue_prompt(self, prompt: dict, client_id: str | None = None, **extra) -> dict:
        body = {"prompt": prompt, **extra}
        if client_id:
            body["client_id"] = client_id
        response = self.post("/prompt", body)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_history(self, prompt_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json()
            if prompt_id in entry:
                return entry[prompt_id]
            time.sleep(0.02)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, **extra) -> dict:
        return self.wait_history(self.queue_prompt(prompt, **extra)["prompt_id"])

    def ws(self, client_id: str | None = None) -> "WS":
        return WS(self, client_id or uuid.uuid4().hex)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class WS:
    """A WebSocket client collecting messages; `until()` reads until a predicate matches."""

    def __init__(self, server: Server, client_id: str):
        self.client_id = client_id
        self.sock = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}",
                                                timeout=60)
        self.messages: list = []

    def recv(self):
        frame = self.sock.recv()
        message = frame if isinstance(frame, bytes) else json.loads(frame)
        self.messages.append(message)
        return message

    def until(self, predicate, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        start = len(self.messages)
        while time.monotonic() < deadline:
            message = self.recv()
            if not isinstance(message, bytes) and predicate(message):
                return self.messages[start:]
        raise TimeoutError("message not received")

    def until_done(self, prompt_id: str) -> list:
        return self.until(lambda m: m["type"] == "executing" and m["data"].get("node") is None
                          and m["data"].get("prompt_id") == prompt_id)

    def close(self) -> None:
        self.sock.close()


def resident_fraction(tensor) -> float:
    """Share of the whole pages inside `tensor` mapped in this process now (/proc/self/pagemap's present bit;
    mincore would tell the page cache's state instead)."""
    import mmap
    import struct

    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page)
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page
    assert last > first
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first}Q", pagemap.read((last - first) * 8))
    return sum(entry >> 63 for entry in entries) / (last - first)


def types_of(messages) -> list[str]:
    return [m["type"] for m in messages if not isinstance(m, bytes)]


# -- prompts of the test pack's nodes (tests/packs/engine_test_nodes.py), and reading what servers report --
def number(value):
    return {"class_type": "Number", "inputs": {"value": value}}


def record(value):
    return {"class_type": "Record", "inputs": {"value": value}}


def simple_prompt(value=1):
    """Number -> Record: the smallest prompt that runs a node and has an output."""
    return {"1": number(value), "2": record(["1", 0])}


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_until(predicate, timeout: float = 30, what: str = "condition"):
    """Polls predicate until it returns something true (and returns that), or fails after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise TimeoutError(f"{what} not reached within {timeout} s")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One shared server (lazy warm-up, classic cache) for tests that don't need special flags."""
    srv = Server(tmp_path_factory.mktemp("shared-server"))
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tmp_path):
    """Starts servers with custom flags; stops them after the test."""
    started = []

    def start(*args, env=None, packs=("engine_test_nodes.py",), wait_ready=True, base=None, launcher=()):
        """`launcher` goes before the command, e.g. ("prlimit", "--nofile=128:128")."""
        srv = Server(base or tmp_path / f"base{len(started)}", args, env, packs, wait_ready, launcher)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
