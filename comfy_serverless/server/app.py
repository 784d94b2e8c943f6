"""One server: its context, catalogue, queue, worker, WebSocket hub and HTTP routes, started in stages.

Start-up order is the point of the project: read the catalogue snapshot (milliseconds), listen, and only
then (or on the first prompt, or before listening, by `--warmup`) import node packs and torch. The pieces
live next door: warmup.py (catalogue and warm-up), worker.py (the prompt worker and its supervision),
shutdown.py (SIGTERM drain), http.py and websocket.py (the front).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal

from .. import context
from ..engine.queue import PromptQueue
from . import pack_routes
from .http import Limits, Router
from .metrics import Metrics
from .middleware import build_middleware
from .pack_connections import PackHTTPServer
from .shutdown import drain
from .warmup import CatalogLoader, call_on_loop
from .websocket import Hub
from .worker import SUPERVISE_INTERVAL_S, PromptWorker

log = logging.getLogger("comfy_serverless")

WARMUP_FALLBACK_DELAY_S = 0.5


class App:
    def __init__(self, settings, argv: list[str]):
        self.context = context.ServerContext(settings)  # this server's state; nothing process-wide is set
        self.context.slot("app", lambda: self)  # what node packs reach as PromptServer.instance (pack_routes.py)
        self.settings = settings
        self.folders = self.context.folders
        self.argv = argv
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue = PromptQueue(on_change=self._queue_changed)
        self.catalogs = CatalogLoader(self.context, argv)
        self.metrics = Metrics()
        self.features = {"supports_preview_metadata": True, "max_upload_size": settings.max_upload_bytes}
        self.hub = Hub(self.features, self.queue.remaining, self._reconnect_state, settings)
        self.worker = PromptWorker(self.context, self.queue, self.hub, self.metrics, self.catalogs.load_class,
                                   self._queue_changed)
        self.backend = None
        if settings.backend_configured:  # imported only then: the front's start stays as it is without one
            from ..backend.backend import Backend

            self.backend = Backend(self.context, self.hub, self.catalogs.set_backend_info)
            self.worker.backend = self.backend
            self.worker.needs_backend = lambda prompt: self.catalog is not None and self.catalog.needs_backend(prompt)
        self.http: PackHTTPServer | None = None
        self.prompt_counter = 0
        self.draining = False  # after SIGTERM: no new prompts, /ready 503
        self.exit_status = 0  # 1 when the shutdown dropped or interrupted prompts

    @property
    def catalog(self):
        return self.catalogs.catalog

    # -- start-up ----------------------------------------------------------------------------------
    def prepare_directories(self) -> None:
        for directory in (self.folders.input, self.folders.output, self.folders.user):
            os.makedirs(directory, exist_ok=True)
        shutil.rmtree(self.folders.temp, ignore_errors=True)  # ComfyUI wipes temp at every start
        os.makedirs(self.folders.temp, exist_ok=True)

    def load_catalog_snapshot(self) -> None:
        self.context.run(self.catalogs.load_snapshot)  # the catalogue puts packs' model folders into ours

    def warm_up_now(self) -> None:
        """Eager warm-up, before listening."""
        self.context.run(self.catalogs.warm_up_now)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.context.activate()  # tasks and threads made from here on belong to this server
        self.catalogs.attach(self.loop)
        if self.backend is not None:
            self.backend.attach(self.loop)
            if self.settings.warmup == "eager":  # everything warm before listening
                self.backend.start()
                try:
                    await self.backend.wait_up()
                except ConnectionError as exc:
                    log.error("the ComfyUI backend is not up before listening: %s", exc)
        router = Router()
        from .routes import register_routes

        register_routes(router, self)
        pack_routes.attach(self, router)  # routes node packs registered, now and later (imports after listening)
        self.http = PackHTTPServer(router, Limits.from_settings(self.settings, self.folders.temp),
                               build_middleware(self.settings, router),
                               self.hub.handle, access_log=not self.settings.dont_print_server)
        await self.http.start(self.settings.listen_addresses, self.settings.port, self._ssl_context())
        self.context.timeline.mark("listening")
        scheme = "https" if self.settings.tls_keyfile else "http"
        for host, port in zip(self.settings.listen_addresses, self.http.bound_ports):
            shown = f"[{host}]" if ":" in host else host
            log.info("comfy-serverless listening on %s://%s:%d", scheme, shown, port)
        self.worker.loop = self.loop
        self.worker.start()
        self.loop.call_later(SUPERVISE_INTERVAL_S, self.worker.supervise)
        if self.settings.warmup == "background":
            # Importing torch holds the GIL for long stretches (measured: the first answer came 0.33 s later
            # when the import started at once), so begin right after the first answer, e.g. the platform's
            # first probe, or shortly after listening when nobody asks.
            self.http.on_first_response = self._start_background_once
            self.loop.call_later(WARMUP_FALLBACK_DELAY_S, self._start_background_once)
        elif self.catalogs.stale and self.settings.warmup == "lazy":
            self.catalogs.start_background_once()

    def _start_background_once(self) -> None:
        self.catalogs.start_background_once()
        if self.backend is not None:
            self.backend.start()  # no-op once started

    def _ssl_context(self):
        s = self.settings
        if not (s.tls_keyfile and s.tls_certfile):
            return None
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(s.tls_certfile, s.tls_keyfile)
        return ssl_context

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Serves until SIGTERM/SIGINT (or `stop` is set), then drains."""
        await self.start()
        stop = stop or asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self._on_signal, stop)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        await stop.wait()
        self.draining = True
        self.exit_status = await drain(self)
        self.worker.stopping = True
        if self.backend is not None:
            await self.backend.stop()
        await self.http.close()
        log.info("stopped")

    def _on_signal(self, stop: asyncio.Event) -> None:
        if stop.is_set():  # a second signal: stop now
            left = self.queue.remaining()
            log.warning("second signal: exiting without waiting (%d prompt(s) unfinished)", left)
            os._exit(1 if left else 0)
        stop.set()

    # -- state the front reports -------------------------------------------------------------------
    def _reconnect_state(self):
        return self.worker.running_client, self.worker.executing_node

    def _queue_changed(self) -> None:
        if self.loop is None:
            return
        message = self.hub.status_message()  # taken now: the worker may change the queue again before it is sent
        try:
            call_on_loop(self.loop, self.hub.send, "status", message)
        except RuntimeError:  # the loop closed at exit
            pass

    def request_interrupt(self, prompt_id: str | None) -> None:
        if prompt_id is None or prompt_id in self.queue.running_prompt_ids():
            self.context.interrupt.set()
