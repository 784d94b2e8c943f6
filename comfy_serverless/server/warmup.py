"""The node catalogue a server answers from, and the warm-up that imports node packs and torch.

The snapshot is read at start (milliseconds); `--warmup` decides when packs are imported: lazy (on the first
prompt that needs a class), background (right after the first answer), eager (before listening). A stale
snapshot is rebuilt from the live classes, or in a subprocess in lazy mode so torch stays out of this one.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import traceback

from ..catalog import packs, snapshot
from ..catalog.catalog import Catalog

log = logging.getLogger("comfy_serverless")

HEAVY_MODULES = ("torch", "numpy", "PIL.Image")


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

    @property
    def settings(self):
        return self.context.settings

    def load_snapshot(self) -> None:
        s = self.settings
        self.pack_refs = packs.all_pack_refs(self.context.folders.model_dirs("custom_nodes"),
                                             s.disable_all_custom_nodes, s.whitelist_custom_nodes)
        expected = snapshot.fingerprint(self.pack_refs)
        snap = snapshot.load(s.catalog_file)
        if snap is not None:
            self.catalog = Catalog(snap)
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
        catalog = Catalog(snap)

        def swap():
            self.catalog = catalog
            self.stale = False
            if self.ready is not None:  # None while eager warm-up runs before the event loop
                self.ready.set()
            self.context.timeline.mark("catalog_loaded")
            log.info("catalogue: %d nodes ready", len(catalog))

        call_on_loop(self.loop, swap)

    def _rebuild_in_subprocess(self) -> None:
        """Lazy mode keeps torch out of this process: another process imports the packs."""
        command = [sys.executable, "-m", "comfy_serverless", "snapshot", *self.argv]
        try:
            # Its log (import errors of custom nodes included) goes to this server's log.
            result = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=600)
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
