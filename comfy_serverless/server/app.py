"""The server process: catalogue, queue, worker thread, WebSocket hub and HTTP routes, started in stages.

Start-up order is the point of the project: read the catalogue snapshot (milliseconds), listen, and only
then (or on the first prompt, or before listening, by `--warmup`) import node packs and torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback

import time

from .. import logs, memory, paths, progress, timeline
from ..catalog import packs, snapshot
from ..catalog.catalog import Catalog
from ..engine.executor import Executor, now_ms, type_name
from ..engine.queue import PromptQueue

from .http import HTTPServer, Limits, Router
from .metrics import Metrics
from .middleware import build_middleware
from .websocket import Hub

log = logging.getLogger("comfy_serverless")

HEAVY_MODULES = ("torch", "numpy", "PIL.Image")
WARMUP_FALLBACK_DELAY_S = 0.5
SUPERVISE_INTERVAL_S = 1.0
IDLE_STUCK_S = 10.0  # pending prompts but no worker tick for this long: the worker is stuck outside a prompt
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5  # a worker that keeps dying is a broken process: stop restarting, fail /health
DRAIN_INTERRUPT_WAIT_S = 10.0
# Sent only once the history entry is written: clients read /history as soon as they see one of these.
FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
SHUTDOWN_MESSAGE = "server shut down before the prompt ran"


class App:
    def __init__(self, settings, argv: list[str]):
        self.settings = settings
        self.argv = argv
        self.folders = paths.configure(settings)
        self.queue = PromptQueue(on_change=self._queue_changed)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.catalog: Catalog | None = None
        self.catalog_stale = False
        self.catalog_ready: asyncio.Event | None = None
        self.prompt_counter = 0
        self.running_client: str | None = None
        self.executing_node: str | None = None
        self.warmup_state = "not started"
        self.pack_refs: list[str] = []
        self.features = {"supports_preview_metadata": True, "max_upload_size": settings.max_upload_bytes}
        self.hub = Hub(self.features, self.queue.remaining, lambda: (self.running_client, self.executing_node),
                       settings)
        self.executor = Executor(self._load_class, self._notify_from_worker, settings.cache_mode,
                                 settings.cache_lru or 0)
        self.http: HTTPServer | None = None
        self.metrics = Metrics()
        self.draining = False  # after SIGTERM: no new prompts, /ready 503
        self.exit_status = 0  # 1 when the shutdown dropped or interrupted prompts
        self._stopping = False
        self._background_started = False
        # Worker health: the thread, its heartbeat, restarts by the supervisor.
        self._worker_thread: threading.Thread | None = None
        self._worker_beat = time.monotonic()  # last loop tick, prompt start or engine event
        self._worker_prompt: str | None = None  # prompt the worker is executing
        self._worker_start_failed = False
        self._worker_gave_up = False
        self._restart_times: list[float] = []
        self.worker_restarts = 0
        self._held: list = []  # final messages of the running prompt, released after its history entry
        self._held_lock = threading.Lock()

    # -- start-up ----------------------------------------------------------------------------------
    def prepare_directories(self) -> None:
        for directory in (self.folders.input, self.folders.output, self.folders.user):
            os.makedirs(directory, exist_ok=True)
        shutil.rmtree(self.folders.temp, ignore_errors=True)  # ComfyUI wipes temp at every start
        os.makedirs(self.folders.temp, exist_ok=True)

    def load_catalog_snapshot(self) -> None:
        s = self.settings
        self.pack_refs = packs.all_pack_refs(self.folders.model_dirs("custom_nodes"),
                                             s.disable_all_custom_nodes, s.whitelist_custom_nodes)
        expected = snapshot.fingerprint(self.pack_refs)
        snap = snapshot.load(s.catalog_path)
        if snap is not None:
            self.catalog = Catalog(snap)
            self.catalog_stale = snap.get("fingerprint") != expected
            log.info("catalogue: %d nodes from %s%s", len(self.catalog), s.catalog_path,
                     " (stale: rebuilding in the background)" if self.catalog_stale else "")
        else:
            self.catalog_stale = True
            log.info("catalogue: no snapshot at %s yet; building it", s.catalog_path)

    def warm_up_now(self) -> None:
        """Imports packs and heavy modules; rebuilds the catalogue from the live classes when stale."""
        self.warmup_state = "importing"
        classes = packs.import_all(self.pack_refs)
        for name in HEAVY_MODULES:
            __import__(name)
        timeline.mark("packs_imported")
        if self.catalog_stale or self.catalog is None:
            nodes, failed = snapshot.describe_classes(classes)
            snap = {"format": snapshot.FORMAT, "fingerprint": snapshot.fingerprint(self.pack_refs),
                    "nodes": nodes, "failed": failed}
            self._install_catalog(snap, save=True)
        self.warmup_state = "done"

    def _install_catalog(self, snap: dict, save: bool) -> None:
        if save:
            try:
                snapshot.save(snap, self.settings.catalog_path)
            except OSError as exc:
                log.warning("cannot save the catalogue snapshot: %s", exc)
        catalog = Catalog(snap)

        def swap():
            self.catalog = catalog
            self.catalog_stale = False
            if self.catalog_ready is not None:  # None while eager warm-up runs before the event loop
                self.catalog_ready.set()
            timeline.mark("catalog_loaded")
            log.info("catalogue: %d nodes ready", len(catalog))

        if self.loop is not None and threading.current_thread() is not threading.main_thread():
            self.loop.call_soon_threadsafe(swap)
        else:
            swap()

    def _rebuild_in_subprocess(self) -> None:
        """Lazy mode keeps torch out of this process: another process imports the packs."""
        command = [sys.executable, "-m", "comfy_serverless", "snapshot", *self.argv]
        try:
            # Its log (import errors of custom nodes included) goes to this server's log.
            result = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=600)
            if result.returncode != 0:
                log.error("catalogue rebuild failed (exit status %s)", result.returncode)
                return
            snap = snapshot.load(self.settings.catalog_path)
            if snap is not None:
                self._install_catalog(snap, save=False)
        except Exception:
            log.error("catalogue rebuild failed:\n%s", traceback.format_exc())

    def _start_background_once(self) -> None:
        if not self._background_started:
            self._background_started = True
            threading.Thread(target=self._background_start, name="warm-up", daemon=True).start()

    def _background_start(self) -> None:
        try:
            if self.settings.warmup == "background":
                self.warm_up_now()
            elif self.catalog_stale:
                self._rebuild_in_subprocess()
        except Exception:
            self.warmup_state = "failed"
            log.error("warm-up failed:\n%s", traceback.format_exc())

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.catalog_ready = asyncio.Event()
        if self.catalog is not None:
            self.catalog_ready.set()
            if not self.catalog_stale:
                timeline.mark("catalog_loaded")
        router = Router()
        from .routes import register_routes

        register_routes(router, self)
        self.http = HTTPServer(router, Limits.from_settings(self.settings, self.folders.temp),
                               build_middleware(self.settings, router),
                               self.hub.handle, access_log=not self.settings.dont_print_server)
        await self.http.start(self.settings.listen_addresses, self.settings.port, self._ssl_context())
        timeline.mark("listening")
        scheme = "https" if self.settings.tls_keyfile else "http"
        for host, port in zip(self.settings.listen_addresses, self.http.bound_ports):
            shown = f"[{host}]" if ":" in host else host
            log.info("comfy-serverless listening on %s://%s:%d", scheme, shown, port)
        self._start_worker()
        self.loop.call_later(SUPERVISE_INTERVAL_S, self._supervise)
        if self.settings.warmup == "background":
            # Importing torch holds the GIL for long stretches (measured: the first answer came 0.33 s later
            # when the import started at once), so begin right after the first answer, e.g. the platform's
            # first probe, or shortly after listening when nobody asks.
            self.http.on_first_response = self._start_background_once
            self.loop.call_later(WARMUP_FALLBACK_DELAY_S, self._start_background_once)
        elif self.catalog_stale and self.settings.warmup == "lazy":
            self._start_background_once()

    def _ssl_context(self):
        s = self.settings
        if not (s.tls_keyfile and s.tls_certfile):
            return None
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_certfile, s.tls_keyfile)
        return context

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self._on_signal, stop)
            except (NotImplementedError, RuntimeError):
                pass
        await stop.wait()
        await self.drain()
        self._stopping = True
        await self.http.close()
        log.info("stopped")

    def _on_signal(self, stop: asyncio.Event) -> None:
        if stop.is_set():  # a second signal: stop now
            left = self.queue.remaining()
            log.warning("second signal: exiting without waiting (%d prompt(s) unfinished)", left)
            os._exit(1 if left else 0)
        stop.set()

    async def drain(self) -> None:
        """Refuses new prompts, lets queued and running ones finish within the grace period, then fails the
        pending ones and interrupts the running one; `exit_status` becomes 1 when any prompt did not finish."""
        self.draining = True
        grace = max(0.0, float(self.settings.shutdown_grace))
        log.info("shutting down: %d prompt(s) left, waiting up to %.0f s", self.queue.remaining(), grace)
        deadline = time.monotonic() + grace
        while self.queue.remaining() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.queue.remaining():
            return
        dropped = self.queue.close()  # the worker takes nothing more
        for item in dropped:
            self._end_unrun(item, _failure_entry(item[1], SHUTDOWN_MESSAGE, "ServerShutdown"))
        running = self.queue.running_prompt_ids()
        ids = ", ".join(item[1] for item in dropped)
        if running:
            log.warning("grace period over: interrupted the running prompt, dropped %d pending%s", len(dropped),
                        f" ({ids})" if ids else "")
        else:
            log.warning("grace period over: dropped %d pending (%s)", len(dropped), ids)
        end = time.monotonic() + DRAIN_INTERRUPT_WAIT_S
        while self.queue.running() and time.monotonic() < end:
            # Again each time: a prompt dequeued just before close() clears the flag when it starts.
            progress.request_interrupt()
            await asyncio.sleep(0.05)
        entries = {}
        for item in self.queue.fail_running(lambda item: entries.setdefault(item[1], _interrupted_entry(item[1]))):
            log.warning("prompt %s did not stop within %.0f s of the interrupt; recorded as interrupted",
                        item[1], DRAIN_INTERRUPT_WAIT_S)
            self._tell_client(item, "execution_interrupted", _final_data(entries[item[1]]))
        interrupted = [pid for pid in running if _outcome(self.queue.history_entry(pid).get(pid) or {}) != "success"]
        if interrupted:
            log.warning("interrupted at shutdown: %s", ", ".join(interrupted))
        self.exit_status = 1 if dropped or interrupted else 0

    def _end_unrun(self, item: list, entry: dict) -> None:
        """History entry and execution_error message for a prompt that will never run (event loop thread)."""
        self.queue.record(item, entry)
        self._tell_client(item, "execution_error", _final_data(entry))

    def _tell_client(self, item: list, event: str, data: dict) -> None:
        client = _client_of(item)
        if client is not None:
            self.hub.send(event, data, client)

    # -- node classes ------------------------------------------------------------------------------
    def _load_class(self, class_type: str):
        catalog = self.catalog
        if catalog is None or class_type not in catalog:
            raise RuntimeError(f"node {class_type} is not in the catalogue")
        cls = catalog.load_class(class_type)
        return cls

    # -- worker ------------------------------------------------------------------------------------
    def _start_worker(self) -> bool:
        try:
            thread = threading.Thread(target=self._worker, name="prompt-worker", daemon=True)
            thread.start()
        except Exception:  # e.g. no more threads: /health reports it until a later try succeeds
            log.error("cannot start the prompt worker:\n%s", traceback.format_exc())
            self._worker_start_failed = True
            return False
        self._worker_thread = thread
        self._worker_start_failed = False
        return True

    def _worker(self) -> None:
        """Takes prompts one at a time; nothing a prompt does (or any step around it) ends this loop."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        while not self._stopping:
            self._worker_beat = time.monotonic()
            try:
                got = self.queue.get(timeout=1.0)
                if got is not None:
                    loop = self._run_prompt(loop, *got)
                self._apply_free_flags()
            except BaseException:  # the loop must survive; a prompt taken here was already ended by _run_prompt
                log.error("prompt worker error (continuing):\n%s", traceback.format_exc())
                time.sleep(0.1)  # no hot spin if the failure repeats

    def _run_prompt(self, loop, item: list, task_id: int):
        """Runs one prompt and always ends it: history entry first, then its final messages. Returns the event
        loop for the next prompt (a new one after a BaseException, which leaves the old one unusable)."""
        prompt_id = item[1]
        started = time.monotonic()
        self._worker_prompt = prompt_id
        self._worker_beat = started
        client = _client_of(item)
        self.running_client = client
        token = logs.current_prompt.set(prompt_id)
        crash = None
        try:
            timeline.mark("first_prompt_started")
            log.info("prompt started")
            entry = loop.run_until_complete(self.executor.execute(prompt_id, item[2], item[3], item[4]))
            if not isinstance(entry, dict):
                raise TypeError(f"the executor returned {type(entry).__name__}, not a history entry")
        except BaseException as exc:  # an engine bug, or SystemExit & co. from a node: fail this prompt only
            log.error("prompt %s crashed the executor:\n%s", prompt_id, traceback.format_exc())
            node_id = self.executing_node
            node = item[2].get(node_id) if node_id and isinstance(item[2], dict) else None
            entry = _failure_entry(prompt_id, str(exc) or type_name(type(exc)), type_name(type(exc)),
                                   traceback.format_tb(exc.__traceback__), node_id,
                                   node.get("class_type") if isinstance(node, dict) else None)
            crash = _final_data(entry)
            if not isinstance(exc, Exception):
                loop = _fresh_loop(loop)
        try:
            outcome = _outcome(entry)
            self.metrics.prompt_finished(outcome, time.monotonic() - started)
            log.info("prompt finished: %s in %.2f s", outcome, time.monotonic() - started)
        except Exception:
            log.error("prompt %s: recording metrics failed:\n%s", prompt_id, traceback.format_exc())
        finally:
            logs.current_prompt.reset(token)
        try:
            self.queue.task_done(task_id, entry, notify=False)
        except BaseException as exc:
            log.error("prompt %s: writing its history entry failed:\n%s", prompt_id, traceback.format_exc())
            failed = _failure_entry(prompt_id, f"writing the history entry failed: {exc}", type_name(type(exc)))
            self.queue.fail_running(lambda _item: failed)
            crash = _final_data(failed)
        held = self._take_held()
        if crash is not None:  # the held messages (if any) no longer tell the outcome
            held = [("execution_error", crash, client)] if client is not None else []
        self._worker_prompt = None
        self.running_client = None
        self.executing_node = None
        try:
            for event, data, sid in held:
                self.loop.call_soon_threadsafe(self.hub.send, event, data, sid)
            self._queue_changed()
            if client is not None:
                self.loop.call_soon_threadsafe(self.hub.send, "executing", {"node": None, "prompt_id": prompt_id},
                                               client)
        except Exception:  # e.g. the event loop closed at exit
            log.error("prompt %s: sending its final messages failed:\n%s", prompt_id, traceback.format_exc())
        timeline.mark("first_prompt_done")
        if self.settings.disable_smart_memory:
            memory.unload_models()
        return loop

    def _take_held(self) -> list:
        with self._held_lock:
            held, self._held = self._held, []
        return held

    # -- supervision -------------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Event-loop timer: restarts a dead worker thread."""
        try:
            self.check_worker()
        except Exception:
            log.error("worker supervision failed:\n%s", traceback.format_exc())
        if not self._stopping:
            self.loop.call_later(SUPERVISE_INTERVAL_S, self._supervise)

    def check_worker(self) -> None:
        thread = self._worker_thread
        if self._stopping or self._worker_gave_up or (thread is not None and thread.is_alive()):
            return
        if thread is None and not self._worker_start_failed:
            return  # not started yet
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S]
        if len(self._restart_times) >= MAX_RESTARTS_IN_WINDOW:
            self._worker_gave_up = True
            self._worker_start_failed = True
            log.error("the prompt worker died %d times within %.0f s; no more restarts (/health fails now)",
                      len(self._restart_times), RESTART_WINDOW_S)
            return
        message = "the prompt worker died while running this prompt"
        entries = {}
        orphans = self.queue.fail_running(
            lambda item: entries.setdefault(item[1], _failure_entry(item[1], message, "WorkerDied")))
        self._take_held()  # they told a story the history no longer does
        for item in orphans:
            log.error("prompt %s failed: %s", item[1], message)
            self._tell_client(item, "execution_error", _final_data(entries[item[1]]))
            client = _client_of(item)
            if client is not None:
                self.hub.send("executing", {"node": None, "prompt_id": item[1]}, client)
        self._worker_prompt = None
        self.running_client = None
        self.executing_node = None
        self._restart_times.append(now)
        self.worker_restarts += 1
        log.error("the prompt worker thread died; restarting it (restart %d)", self.worker_restarts)
        self._start_worker()

    @property
    def worker_up(self) -> bool:
        thread = self._worker_thread
        return thread is not None and thread.is_alive()

    def worker_dead_for_good(self) -> bool:
        """A dead worker that could not be restarted: the process is useless (liveness fails)."""
        return not self.worker_up and self._worker_start_failed

    def seconds_since_progress(self) -> float:
        return max(0.0, time.monotonic() - self._worker_beat)

    def worker_problems(self) -> list[str]:
        """Why the worker cannot take prompts now (for /ready); empty when it is healthy."""
        if self._worker_thread is None and not self._worker_start_failed:
            return []
        if not self.worker_up:
            return ["prompt worker is not running" + (" and could not be restarted" if self._worker_start_failed
                                                      else " (restarting)")]
        quiet = self.seconds_since_progress()
        stall = float(self.settings.worker_stall_timeout or 0)
        running = self._worker_prompt
        if running is not None:
            if stall > 0 and quiet > stall:
                return [f"prompt worker stuck: no progress for {quiet:.0f} s on prompt {running} "
                        f"(--worker-stall-timeout {stall:g})"]
        elif self.queue.pending_count() and quiet > IDLE_STUCK_S:
            return [f"prompt worker stuck: {self.queue.pending_count()} prompt(s) pending but it has not taken "
                    f"one for {quiet:.0f} s"]
        return []

    def _apply_free_flags(self) -> None:
        flags = self.queue.take_flags()
        if flags.get("unload_models") or flags.get("free_memory"):
            memory.unload_models()
        if flags.get("free_memory"):
            self.executor.reset()
            log.info("caches and models freed")

    # -- messages ----------------------------------------------------------------------------------
    def _notify_from_worker(self, event: str, data: dict, sid: str | None) -> None:
        self._worker_beat = time.monotonic()
        if (event in FINAL_EVENTS and self._worker_prompt is not None
                and data.get("prompt_id") == self._worker_prompt):
            with self._held_lock:
                self._held.append((event, data, sid))
            return
        if self._held:  # a held message was not the last one (a blocker's execution_error): keep the order
            for held_event, held_data, held_sid in self._take_held():
                self.loop.call_soon_threadsafe(self.hub.send, held_event, held_data, held_sid)
        if event == "executing":
            self.executing_node = data.get("node")
        if event == "__preview__":
            encoded = encode_preview(data["preview"], self.settings.preview_size)
            if encoded is None:
                return
            meta = data["meta"]
            metadata = {"node_id": data["node_id"], "prompt_id": data["prompt_id"],
                        "display_node_id": meta["display_node"], "parent_node_id": meta["parent_node"],
                        "real_node_id": meta["real_node_id"]}
            self.loop.call_soon_threadsafe(self.hub.send_preview, encoded[0], encoded[1], metadata, sid)
            return
        self.loop.call_soon_threadsafe(self.hub.send, event, data, sid)

    def _queue_changed(self) -> None:
        if self.loop is None:
            return
        message = self.hub.status_message()  # taken now: the worker may change the queue again before it is sent
        if threading.current_thread() is threading.main_thread():
            self.hub.send("status", message)
        else:
            self.loop.call_soon_threadsafe(self.hub.send, "status", message)

    def request_interrupt(self, prompt_id: str | None) -> None:
        if prompt_id is None or prompt_id in self.queue.running_prompt_ids():
            progress.request_interrupt()


def _client_of(item: list) -> str | None:
    extra = item[3] if len(item) > 3 else None
    client = extra.get("client_id") if isinstance(extra, dict) else None
    return client if isinstance(client, str) else None


def _failure_entry(prompt_id: str, message: str, exception_type: str, tb=(), node_id=None, node_type=None) -> dict:
    """ComfyUI's history shape for a prompt that failed outside any node's own error handling."""
    data = {"prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": [],
            "exception_message": message, "exception_type": exception_type, "traceback": list(tb),
            "current_inputs": {}, "current_outputs": [], "timestamp": now_ms()}
    return {"outputs": {}, "meta": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", data]]}}


def _interrupted_entry(prompt_id: str) -> dict:
    data = {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [], "timestamp": now_ms()}
    return {"outputs": {}, "meta": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_interrupted", data]]}}


def _final_data(entry: dict) -> dict:
    return entry["status"]["messages"][-1][1]


def _fresh_loop(old):
    try:
        old.close()
    except Exception:
        pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def _outcome(entry: dict) -> str:
    messages = entry.get("status", {}).get("messages") or []
    last = messages[-1][0] if messages else ""
    return {"execution_success": "success", "execution_interrupted": "interrupted"}.get(last, "error")


def encode_preview(preview, max_size: int):
    """(format, PIL image, max size) -> (mime type, bytes), scaled to fit and encoded (worker thread)."""
    try:
        fmt, image, size = preview
        import io

        from PIL import Image

        limit = min(size or max_size, max_size)
        if max(image.size) > limit:
            image = image.copy()
            image.thumbnail((limit, limit), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if str(fmt).upper() == "PNG":
            image.save(buffer, format="PNG")
            return "image/png", buffer.getvalue()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return "image/jpeg", buffer.getvalue()
    except Exception:
        log.warning("could not encode a preview:\n%s", traceback.format_exc())
        return None
