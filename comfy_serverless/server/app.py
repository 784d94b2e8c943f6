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
from ..engine.executor import Executor, now_ms
from ..engine.queue import PromptQueue

from .http import HTTPServer, Router
from .metrics import Metrics
from .middleware import build_middleware
from .websocket import Hub

log = logging.getLogger("comfy_serverless")

HEAVY_MODULES = ("torch", "numpy", "PIL.Image")
WARMUP_FALLBACK_DELAY_S = 0.5


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
        self._stopping = False
        self._background_started = False

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
        self.http = HTTPServer(router, self.settings.max_upload_bytes, build_middleware(self.settings),
                               self.hub.handle, access_log=not self.settings.dont_print_server)
        await self.http.start(self.settings.listen_addresses, self.settings.port, self._ssl_context())
        timeline.mark("listening")
        scheme = "https" if self.settings.tls_keyfile else "http"
        for host, port in zip(self.settings.listen_addresses, self.http.bound_ports):
            shown = f"[{host}]" if ":" in host else host
            log.info("comfy-serverless listening on %s://%s:%d", scheme, shown, port)
        threading.Thread(target=self._worker, name="prompt-worker", daemon=True).start()
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
            log.warning("second signal: exiting without waiting")
            os._exit(0)
        stop.set()

    async def drain(self) -> None:
        """Refuses new prompts, lets queued and running ones finish within the grace period, then interrupts."""
        self.draining = True
        grace = max(0.0, float(self.settings.shutdown_grace))
        log.info("shutting down: %d prompt(s) left, waiting up to %.0f s", self.queue.remaining(), grace)
        deadline = time.monotonic() + grace
        while self.queue.remaining() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.queue.remaining():
            dropped = self.queue.pending_count()
            self.queue.wipe()
            progress.request_interrupt()
            log.warning("grace period over: interrupted the running prompt, dropped %d pending", dropped)
            end = time.monotonic() + 10
            while self.queue.running() and time.monotonic() < end:
                await asyncio.sleep(0.05)

    # -- node classes ------------------------------------------------------------------------------
    def _load_class(self, class_type: str):
        catalog = self.catalog
        if catalog is None or class_type not in catalog:
            raise RuntimeError(f"node {class_type} is not in the catalogue")
        cls = catalog.load_class(class_type)
        return cls

    # -- worker ------------------------------------------------------------------------------------
    def _worker(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        while not self._stopping:
            got = self.queue.get(timeout=1.0)
            if got is None:
                self._apply_free_flags()
                continue
            item, task_id = got
            prompt_id, prompt, extra_data, outputs = item[1], item[2], item[3], item[4]
            self.running_client = extra_data.get("client_id")
            timeline.mark("first_prompt_started")
            token = logs.current_prompt.set(prompt_id)
            started = time.monotonic()
            try:
                log.info("prompt started")
                entry = loop.run_until_complete(self.executor.execute(prompt_id, prompt, extra_data, outputs))
            except Exception as exc:  # a bug in the engine must not lose the queue
                log.error("prompt %s crashed the executor:\n%s", prompt_id, traceback.format_exc())
                entry = {"outputs": {}, "meta": {}, "status": {"status_str": "error", "completed": False,
                         "messages": [["execution_error", {"prompt_id": prompt_id, "exception_message": str(exc),
                                                           "timestamp": now_ms()}]]}}
            outcome = _outcome(entry)
            self.metrics.prompt_finished(outcome, time.monotonic() - started)
            log.info("prompt finished: %s in %.2f s", outcome, time.monotonic() - started)
            logs.current_prompt.reset(token)
            self.queue.task_done(task_id, entry)
            client = self.running_client
            self.running_client = None
            self.executing_node = None
            if client is not None:
                self._notify_from_worker("executing", {"node": None, "prompt_id": prompt_id}, client)
            timeline.mark("first_prompt_done")
            if self.settings.disable_smart_memory:
                memory.unload_models()
            self._apply_free_flags()

    def _apply_free_flags(self) -> None:
        flags = self.queue.take_flags()
        if flags.get("unload_models") or flags.get("free_memory"):
            memory.unload_models()
        if flags.get("free_memory"):
            self.executor.reset()
            log.info("caches and models freed")

    # -- messages ----------------------------------------------------------------------------------
    def _notify_from_worker(self, event: str, data: dict, sid: str | None) -> None:
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
