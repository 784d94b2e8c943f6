"""The ComfyUI backend's life (boot, crash, restart, stop) and running one prompt there with its events relayed.

Runs on the server's event loop. The prompt worker hands a prompt over with `run_blocking` and waits; the
prompt keeps its id (ComfyUI takes `prompt_id` in POST /prompt), its events come back over one WebSocket and
go to the prompt's own client, and its history entry is read from the backend once ComfyUI says it is done
(`executing` with node None comes after ComfyUI wrote the entry), then removed there: the front's history is
the only one. A backend that dies fails its running prompt with an `execution_error` and is started again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time

from ..engine import outcomes
from .client import BackendUnavailable, HTTPClient, WebSocketClient, split_url
from .process import TEMP_SUBFOLDER

log = logging.getLogger("comfy_serverless.backend")

PREVIEW_IMAGE_WITH_METADATA = 4
POLL_S = 0.05
HISTORY_POLL_S = 2.0  # fallback when a final event was missed
RESTART_DELAY_S = 0.5
RESTART_WINDOW_S = 120.0
MAX_RESTARTS_IN_WINDOW = 5
DROPPED_EVENTS = ("status", "feature_flags")  # the front sends its own


class _Run:
    """The prompt the backend is running for us (one at a time: the front has one queue)."""

    def __init__(self, prompt_id: str, prompt: dict, client: str | None, emit, send_binary):
        self.prompt_id = prompt_id
        self.prompt = prompt
        self.backend_id = prompt_id
        self.client = client
        self.emit = emit  # (event, data, sid): the worker's notify, which orders and holds final events
        self.send_binary = send_binary
        self.node: str | None = None
        self.done = asyncio.Event()
        self.failure: dict | None = None  # a history entry when the run ended without the backend's own


class Backend:
    def __init__(self, server_context, hub, on_object_info):
        self.context = server_context
        self.settings = server_context.settings
        self.folders = server_context.folders
        self.hub = hub
        self.on_object_info = on_object_info  # (object_info dict) -> None, on the event loop
        self.kind = "process" if self.settings.comfyui else "url"
        self.state = "not started"  # not started | booting | up | restarting | failed | stopped
        self.loop: asyncio.AbstractEventLoop | None = None
        self.http: HTTPClient | None = None
        self.process = None
        self.socket: WebSocketClient | None = None
        self.boot_seconds: float | None = None
        self.boots = 0
        self.restarts = 0
        self.prompts = 0
        self.version: str | None = None
        self.last_error: str | None = None
        self.catalog_live = False  # the backend's /object_info was read from the running backend
        self._up: asyncio.Event | None = None
        self._boot_task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._run: _Run | None = None
        self._restart_times: list[float] = []

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._up = asyncio.Event()

    # set by attach() and a boot: these read them once they exist
    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None, "Backend.attach() was not called"
        return self.loop

    @property
    def _event(self) -> asyncio.Event:
        assert self._up is not None, "Backend.attach() was not called"
        return self._up

    @property
    def _http(self) -> HTTPClient:
        assert self.http is not None, "the backend was never booted"
        return self.http

    @property
    def _socket(self) -> WebSocketClient:
        assert self.socket is not None, "the backend was never booted"
        return self.socket

    # -- life --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts booting unless up, booting or stopped (event loop only)."""
        if self.state in ("not started", "failed") and self.loop is not None:
            self._restart_times = [] if self.state == "failed" else self._restart_times
            self._begin_boot()

    def _begin_boot(self) -> None:
        self.state = "booting"
        self._boot_task = self._loop.create_task(self._boot())

    async def _boot(self) -> None:
        started = time.monotonic()
        self.boots += 1
        try:
            if self.kind == "process":
                from .process import ComfyUIProcess

                self.process = ComfyUIProcess(self.settings, self.folders, self._exited_from_thread)
                await asyncio.to_thread(self.process.start)
                self.http = HTTPClient("127.0.0.1", self.process.port)
            else:
                self.http = HTTPClient(*split_url(self.settings.comfyui_url))
            stats = await self._wait_answering(started)
            self.version = (stats.get("system") or {}).get("comfyui_version") if isinstance(stats, dict) else None
            self.socket = WebSocketClient(self.http)
            await self.socket.connect()
            self._reader = self._loop.create_task(self._read_events(self.socket))
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            self.last_error = reason
            log.error("the ComfyUI backend did not start: %s", reason)
            if self.process is not None:
                await asyncio.to_thread(self.process.stop)
            self.state = "failed"
            return
        self.boot_seconds = round(time.monotonic() - started, 3)
        self.state = "up"
        self.last_error = None
        self._event.set()
        self.context.timeline.mark("backend_ready")
        log.info("the ComfyUI backend (%s) is up after %.2f s", self.version or "unknown version", self.boot_seconds)
        await self._refresh_catalog()

    async def _wait_answering(self, started: float) -> dict:
        deadline = started + float(self.settings.comfyui_boot_timeout)
        while True:
            if self.process is not None and not self.process.alive():
                tail = "\n".join(list(self.process.log_tail)[-10:])
                raise BackendUnavailable(f"ComfyUI exited with status {self.process.proc.returncode} while "
                                         f"starting; its last lines:\n{tail}")
            try:
                status, body = await self._http.request("GET", "/system_stats", timeout=5.0)
                if status == 200:
                    return json.loads(body)
            except (BackendUnavailable, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BackendUnavailable(f"no answer within --comfyui-boot-timeout "
                                         f"{self.settings.comfyui_boot_timeout:g} s")
            await asyncio.sleep(0.1)

    async def _refresh_catalog(self) -> None:
        """The live /object_info replaces the snapshot's (file lists are the backend's files now)."""
        try:
            info = await self._http.get_json("/object_info", timeout=120.0)
        except (BackendUnavailable, ValueError) as exc:
            log.warning("could not read the ComfyUI backend's /object_info: %s", exc)
            return
        if isinstance(info, dict):
            self.catalog_live = True
            self.on_object_info(info)

    async def wait_up(self, timeout: float | None = None) -> None:
        """Starts the backend if needed and waits until it is up; BackendUnavailable when it cannot be."""
        if self.state == "stopped":
            raise BackendUnavailable("the server is shutting down")
        self.start()
        deadline = time.monotonic() + (timeout if timeout is not None else self.settings.comfyui_boot_timeout + 5)
        while not self._event.is_set():
            if self.state in ("failed", "stopped"):
                raise BackendUnavailable(self.last_error or self.state)
            if time.monotonic() > deadline:
                raise BackendUnavailable("timed out waiting for the backend to start")
            await asyncio.sleep(POLL_S)

    async def wait_catalog(self, timeout: float) -> None:
        """Waits until the live /object_info was read (or the backend failed): for prompts naming nodes the
        snapshot does not know."""
        try:
            await self.wait_up(timeout)
        except BackendUnavailable:
            return
        end = time.monotonic() + 5.0
        while not self.catalog_live and time.monotonic() < end and self.state == "up":
            await asyncio.sleep(POLL_S)

    def _exited_from_thread(self, process, returncode: int) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self._loop.call_soon_threadsafe(self._exited, process, returncode)

    def _exited(self, process, returncode: int) -> None:
        if process is not self.process or process.stopping or self.state == "stopped":
            return
        self._lost(f"the ComfyUI backend exited with status {returncode}")

    def _lost(self, reason: str) -> None:
        """The backend died or went away: fail the running prompt, then start it again (event loop)."""
        if self.state != "up":
            return  # already handled, or a boot in progress (it sees the exit itself)
        log.error("%s; restarting it", reason)
        self.last_error = reason
        self._event.clear()
        run = self._run
        if run is not None and not run.done.is_set():
            run.failure = self._failure(run, f"{reason} while running this prompt; it is being restarted",
                                        "BackendCrashed")
            run.done.set()
        if self.socket is not None:
            self.socket.close()
        process = self.process
        if process is not None and process.alive():
            process.stopping = True
            self._loop.run_in_executor(None, process.stop, 2.0)
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S]
        if len(self._restart_times) >= MAX_RESTARTS_IN_WINDOW:
            self.state = "failed"
            log.error("the ComfyUI backend failed %d times within %.0f s; it starts again only when a prompt "
                      "needs it", len(self._restart_times), RESTART_WINDOW_S)
            return
        self._restart_times.append(now)
        self.restarts += 1
        self.state = "restarting"
        self._loop.call_later(RESTART_DELAY_S, self._restart)

    def _restart(self) -> None:
        if self.state == "restarting":
            self._begin_boot()

    async def stop(self) -> None:
        """At shutdown, after the drain: the backend has nothing of ours left to run."""
        self.state = "stopped"
        self._event.clear()
        if self.socket is not None:
            self.socket.close()
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)

    # -- running a prompt -----------------------------------------------------------------------------
    def run_blocking(self, prompt_id: str, prompt: dict, extra_data: dict, outputs: list, notify) -> dict:
        """From the prompt worker's thread: runs the prompt on the backend and returns its history entry."""
        future = asyncio.run_coroutine_threadsafe(self.run_prompt(prompt_id, prompt, extra_data, outputs, notify),
                                                  self._loop)
        return future.result()

    async def run_prompt(self, prompt_id: str, prompt: dict, extra_data: dict, outputs: list, notify) -> dict:
        client = outcomes.client_of([None, prompt_id, prompt, extra_data])
        run = _Run(prompt_id, prompt, client, notify, self._binary_sender(client))
        self.prompts += 1
        self.context.interrupt.clear()  # an interrupt meant for an earlier prompt
        try:
            await self.wait_up()
        except BackendUnavailable as exc:
            tail = list(self.process.log_tail)[-10:] if self.process is not None else []
            return self._fail(run, f"the ComfyUI backend is not available: {exc}", "BackendUnavailable", tail)
        self._run = run
        try:
            return await self._submit_and_wait(run, prompt, extra_data, outputs)
        finally:
            self._run = None

    async def _submit_and_wait(self, run: _Run, prompt: dict, extra_data: dict, outputs: list) -> dict:
        extra = {k: v for k, v in extra_data.items() if k != "client_id"}
        extra["client_id"] = self._socket.client_id
        body = {"prompt": prompt, "prompt_id": run.prompt_id, "client_id": self._socket.client_id,
                "extra_data": extra, "partial_execution_targets": outputs}
        try:
            status, data = await self._http.request("POST", "/prompt", body)
        except BackendUnavailable as exc:
            if run.failure is None:
                return self._fail(run, f"the ComfyUI backend did not take the prompt: {exc}", "BackendUnavailable")
            return self._finish_failure(run)
        if run.failure is not None:
            return self._finish_failure(run)
        answer = _json_or_none(data)
        if status != 200 or not isinstance(answer, dict):
            return self._rejected(run, status, answer, data)
        run.backend_id = str(answer.get("prompt_id") or run.prompt_id)
        entry = await self._wait_done(run)
        return entry

    async def _wait_done(self, run: _Run) -> dict:
        interrupt = self.context.interrupt
        next_poll = time.monotonic() + HISTORY_POLL_S
        while not run.done.is_set():
            if interrupt.is_set():
                interrupt.clear()  # forwarded once per request; drain sets it again while waiting
                await self._post_quietly("/interrupt", {"prompt_id": run.backend_id})
            try:
                await asyncio.wait_for(run.done.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() > next_poll and not run.done.is_set():
                next_poll = time.monotonic() + HISTORY_POLL_S
                entry = await self._history_entry(run)
                if entry is not None:
                    return entry
        if run.failure is not None:
            return self._finish_failure(run)
        entry = await self._history_entry(run)
        if entry is None:
            return self._fail(run, "the ComfyUI backend finished the prompt but has no history entry for it",
                              "BackendHistoryMissing")
        return entry

    async def _history_entry(self, run: _Run) -> dict | None:
        try:
            found = await self._http.get_json(f"/history/{run.backend_id}")
        except (BackendUnavailable, ValueError):
            return None
        entry = found.get(run.backend_id) if isinstance(found, dict) else None
        if not isinstance(entry, dict):
            return None
        # ours is the history clients read; removed there without holding up this prompt's end
        self._loop.create_task(self._post_quietly("/history", {"delete": [run.backend_id]}))
        outputs = entry.get("outputs") or {}
        if isinstance(outputs, dict) and self.kind == "process":
            outputs = {node: shared_temp_paths(ui) if isinstance(ui, dict) else ui for node, ui in outputs.items()}
        result = {"outputs": outputs, "meta": entry.get("meta") or {},
                  "status": entry.get("status") or {"status_str": "error", "completed": False, "messages": []}}
        if run.backend_id != run.prompt_id:
            for message in result["status"].get("messages") or []:
                if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
                    message[1]["prompt_id"] = run.prompt_id
        return result

    async def _post_quietly(self, path: str, body: dict) -> None:
        try:
            await self._http.request("POST", path, body, timeout=10.0)
        except BackendUnavailable as exc:
            log.warning("POST %s to the ComfyUI backend failed: %s", path, exc)

    def _failure(self, run: _Run, message: str, kind: str, tb=()) -> dict:
        node = run.prompt.get(run.node) if run.node is not None else None
        node_type = node.get("class_type") if isinstance(node, dict) else None
        return outcomes.failure_entry(run.prompt_id, message, kind, tb, run.node, node_type)

    def _fail(self, run: _Run, message: str, kind: str, tb=()) -> dict:
        run.failure = self._failure(run, message, kind, tb)
        return self._finish_failure(run)

    def _finish_failure(self, run: _Run) -> dict:
        entry = run.failure
        assert entry is not None
        log.error("prompt %s: %s", run.prompt_id, outcomes.final_data(entry)["exception_message"])
        if run.client is not None:
            run.emit("execution_error", outcomes.final_data(entry), run.client)
        return entry

    def _rejected(self, run: _Run, status: int, answer, raw: bytes) -> dict:
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            text = f"{error.get('message', '')}: {error.get('details', '')}".strip(": ")
        else:
            text = raw[:500].decode("utf-8", "replace")
        entry = self._failure(run, f"the ComfyUI backend refused the prompt (HTTP {status}): {text}",
                              "BackendRejectedPrompt")
        if isinstance(answer, dict) and answer.get("node_errors"):
            outcomes.final_data(entry)["node_errors"] = answer["node_errors"]
        run.failure = entry
        return self._finish_failure(run)

    # -- relayed events ----------------------------------------------------------------------------------
    async def _read_events(self, socket: WebSocketClient) -> None:
        while True:
            message = await socket.receive()
            if message is None:
                break
            try:
                self._relay(*message)
            except Exception:
                log.exception("relaying a ComfyUI backend event failed")
        process = self.process
        for _ in range(40):  # a closed socket usually means a dead process: report its exit status if so
            if process is None or not process.alive() or self.state != "up":
                break
            await asyncio.sleep(POLL_S)
        if socket is self.socket and self.state == "up":
            if process is not None and not process.alive():
                self._lost(f"the ComfyUI backend exited with status {process.proc.returncode}")
            else:
                self._lost("the ComfyUI backend closed its WebSocket")

    def _relay(self, kind: str, payload) -> None:
        run = self._run
        if kind == "binary":
            self._relay_binary(run, payload)
            return
        if not isinstance(payload, dict) or payload.get("type") in DROPPED_EVENTS:
            return
        event, data = payload.get("type"), payload.get("data")
        if isinstance(data, dict) and "prompt_id" in data:
            if run is None or data["prompt_id"] != run.backend_id:
                return  # a prompt that is no longer ours (e.g. failed over), or not ours at all
            data = {**data, "prompt_id": run.prompt_id}
            if event == "executed" and isinstance(data.get("output"), dict) and self.kind == "process":
                data["output"] = shared_temp_paths(data["output"])
            if event == "executing":
                if data.get("node") is None:
                    run.done.set()  # ComfyUI wrote the history entry; the worker sends its own "executing None"
                    return
                run.node = str(data["node"])
            if run.client is not None:
                run.emit(event, data, run.client)
            return
        if event == "executing":
            return
        # a node pack's own message: to the running prompt's client, else to everyone (as ComfyUI's broadcast)
        target = run.client if run is not None else None
        if run is None or target is not None:
            self._loop.call_soon(self.hub.send, event, data, target)  # after the events already posted

    def _binary_sender(self, client: str | None):
        def send(frame: bytes) -> None:
            if client is None or len(frame) < 4:
                return
            event = struct.unpack(">I", frame[:4])[0]
            if event == PREVIEW_IMAGE_WITH_METADATA and len(frame) >= 8:
                size = struct.unpack(">I", frame[4:8])[0]
                metadata = _json_or_none(frame[8:8 + size])
                if isinstance(metadata, dict):
                    image_type = metadata.pop("image_type", "image/jpeg")
                    self.hub.send_preview(image_type, frame[8 + size:], metadata, client)
                    return
            self.hub.send_binary(event, frame[4:], client)
        return send

    def _relay_binary(self, run: _Run | None, frame: bytes) -> None:
        if run is None:
            return
        if len(frame) >= 8 and struct.unpack(">I", frame[:4])[0] == PREVIEW_IMAGE_WITH_METADATA:
            size = struct.unpack(">I", frame[4:8])[0]
            metadata = _json_or_none(frame[8:8 + size])
            if isinstance(metadata, dict) and metadata.get("prompt_id") not in (None, run.backend_id):
                return
            if isinstance(metadata, dict) and run.backend_id != run.prompt_id:
                metadata["prompt_id"] = run.prompt_id
                meta = json.dumps(metadata).encode()
                frame = frame[:4] + struct.pack(">I", len(meta)) + meta + frame[8 + size:]
        # after the text events already queued for the client (the worker posts those through the loop)
        self._loop.call_soon(run.send_binary, frame)

    # -- forwarded requests --------------------------------------------------------------------------------
    async def free(self, body: dict) -> None:
        if self.state == "up":
            await self._post_quietly("/free", body)

    def describe(self) -> dict:
        process = self.process
        return {"kind": self.kind, "state": self.state, "boot_seconds": self.boot_seconds, "boots": self.boots,
                "restarts": self.restarts, "prompts": self.prompts, "comfyui_version": self.version,
                "pid": process.pid if process is not None and process.alive() else None,
                "catalog_live": self.catalog_live, "last_error": self.last_error,
                "prefer_comfyui": bool(self.settings.prefer_comfyui)}


def shared_temp_paths(ui: dict) -> dict:
    """A node's UI output with ComfyUI's temp files named as the front's /view finds them: the ComfyUI child's
    temp directory is the front's temp/comfyui/temp (process.py), so their subfolder gains that prefix. (A
    --comfyui-url ComfyUI keeps its own folders: its names pass unchanged.)"""
    fixed = {}
    for key, values in ui.items():
        if isinstance(values, list):
            values = [_in_shared_temp(item) for item in values]
        fixed[key] = values
    return fixed


def _in_shared_temp(item):
    if not (isinstance(item, dict) and item.get("type") == "temp" and isinstance(item.get("filename"), str)):
        return item
    subfolder = item.get("subfolder") or ""
    return {**item, "subfolder": f"{TEMP_SUBFOLDER}/{subfolder}" if subfolder else TEMP_SUBFOLDER}


def _json_or_none(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
