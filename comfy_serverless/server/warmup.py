"""The node catalogue a server answers from, and the warm-up that imports node packs and torch.

The snapshot is read at start (milliseconds); `--warmup` decides when packs are imported: lazy (on the first
prompt that needs a class), background (right after the first answer), eager (before listening). A stale
snapshot is rebuilt from the live classes, or in a subprocess in lazy mode so torch stays out of this one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import traceback

from ..catalog import packs, snapshot
from ..catalog.catalog import Catalog

log = logging.getLogger("comfy_serverless")

HEAVY_MODULES = ("torch", "numpy", "PIL.Image")
NATIVE_ONLY_ENV = "COMFY_SERVERLESS_SNAPSHOT_NATIVE_ONLY"  # `snapshot` leaves the ComfyUI backend's part alone


class CatalogLoader:
    def __init__(self, server_context, argv: list[str]):
        self.context = server_context
        self.argv = argv
        self.catalog: Catalog | None = None
        self.stale = False
        self.ready: asyncio.Event | None = None  # set once a catalogue is installed (made on the event loop)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state = "not started"  # warm-up state shown in /system_stats
        self.pack_refs: list[str] = []
        self._background_started = False
        self._native: dict | None = None  # the native snapshot the catalogue was made from
        self.backend_info: dict | None = None  # the ComfyUI backend's /object_info (snapshot, then live)
        self.backend_fingerprint: str | None = None  # of the backend part read from the snapshot

    def _catalog(self, snap: dict) -> Catalog:
        self._native = snap
        return Catalog(snap, self.backend_info, bool(self.settings.prefer_comfyui))

    @property
    def settings(self):
        return self.context.settings

    def load_snapshot(self) -> None:
        s = self.settings
        self.pack_refs = packs.all_pack_refs(self.context.folders.model_dirs("custom_nodes"),
                                             s.disable_all_custom_nodes, s.whitelist_custom_nodes)
        expected = snapshot.fingerprint(self.pack_refs)
        if s.backend_configured:
            part = snapshot.load_backend(s.catalog_file)
            if part is not None:
                self.backend_info, self.backend_fingerprint = part["object_info"], part.get("fingerprint")
                log.info("ComfyUI backend catalogue: %d nodes from the snapshot", len(part["object_info"]))
            else:
                log.info("ComfyUI backend catalogue: not in the snapshot yet; read once the backend is up")
        snap = snapshot.load(s.catalog_file)
        if snap is not None:
            self.catalog = self._catalog(snap)
            self.stale = snap.get("fingerprint") != expected
            log.info("catalogue: %d nodes from %s%s", len(self.catalog), s.catalog_file,
                     " (stale: rebuilding in the background)" if self.stale else "")
        else:
            self.stale = True
            log.info("catalogue: no snapshot at %s yet; building it", s.catalog_file)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the event loop once it runs."""
        self.loop = loop
        self.ready = asyncio.Event()
        if self.catalog is not None:
            self.ready.set()
            if not self.stale:
                self.context.timeline.mark("catalog_loaded")

    def load_class(self, class_type: str):
        catalog = self.catalog
        if catalog is None or class_type not in catalog:
            raise RuntimeError(f"node {class_type} is not in the catalogue")
        return catalog.load_class(class_type)

    def warm_up_now(self) -> None:
        """Imports packs and heavy modules; rebuilds the catalogue from the live classes when stale."""
        self.state = "importing"
        classes = packs.import_all(self.pack_refs)
        for name in HEAVY_MODULES:
            __import__(name)
        self.context.timeline.mark("packs_imported")
        if self.stale or self.catalog is None:
            nodes, failed = snapshot.describe_classes(classes)
            snap = {"format": snapshot.FORMAT, "fingerprint": snapshot.fingerprint(self.pack_refs),
                    "nodes": nodes, "failed": failed, "routes": packs.route_table(self.pack_refs)}
            self._install(snap, save=True)
        self.state = "done"

    def start_background_once(self) -> None:
        if not self._background_started:
            self._background_started = True
            threading.Thread(target=self.context.run, args=(self._background,), name="warm-up",
                             daemon=True).start()

    def _background(self) -> None:
        try:
            if self.settings.warmup == "background":
                self.warm_up_now()
            elif self.stale:
                self._rebuild_in_subprocess()
        except Exception:
            self.state = "failed"
            log.error("warm-up failed:\n%s", traceback.format_exc())

    def _install(self, snap: dict, save: bool) -> None:
        if save:
            try:
                snapshot.save(snap, self.settings.catalog_file)
            except OSError as exc:
                log.warning("cannot save the catalogue snapshot: %s", exc)
        catalog = self._catalog(snap)

        def swap():
            self.catalog = catalog
            self.stale = False
            if self.ready is not None:  # None while eager warm-up runs before the event loop
                self.ready.set()
            self.context.timeline.mark("catalog_loaded")
            log.info("catalogue: %d nodes ready", len(catalog))

        call_on_loop(self.loop, swap)

    def set_backend_info(self, info: dict) -> None:
        """The backend's live /object_info joins the catalogue (event loop); saved when the snapshot's differs."""
        self.backend_info = info
        if self._native is not None:
            self.catalog = self._catalog(self._native)
            log.info("catalogue: %d nodes with the ComfyUI backend's (%d run there)", len(self.catalog),
                     self.catalog.backend_nodes)
        threading.Thread(target=self._save_backend_part, args=(info,), name="backend-snapshot", daemon=True).start()

    def _save_backend_part(self, info: dict) -> None:
        s = self.settings
        current = snapshot.comfyui_fingerprint(s.comfyui, s.comfyui_url)
        if current == self.backend_fingerprint:
            return
        try:
            snapshot.save(snapshot.backend_part(current, None, info, 0.0), snapshot.backend_path(s.catalog_file))
            self.backend_fingerprint = current
        except OSError as exc:
            log.warning("cannot save the ComfyUI backend's catalogue: %s", exc)

    def _rebuild_in_subprocess(self) -> None:
        """Lazy mode keeps torch out of this process: another process imports the packs."""
        command = [sys.executable, "-m", "comfy_serverless", "snapshot", *self.argv]
        try:
            # Its log (import errors of custom nodes included) goes to this server's log. Only the native part:
            # the backend's is read from the running backend, never by starting a second one.
            env = {**os.environ, NATIVE_ONLY_ENV: "1"}
            result = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=600, env=env)
            if result.returncode != 0:
                log.error("catalogue rebuild failed (exit status %s)", result.returncode)
                return
            snap = snapshot.load(self.settings.catalog_file)
            if snap is not None:
                self._install(snap, save=False)
        except Exception:
            log.error("catalogue rebuild failed:\n%s", traceback.format_exc())


def call_on_loop(loop: asyncio.AbstractEventLoop | None, callback, *args) -> None:
    """Runs callback on the server's event loop: now when called from it (or before it exists), else soon."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is not None and running is not loop:
        loop.call_soon_threadsafe(callback, *args)
    else:
        callback(*args)
