"""The state one server owns, handed down explicitly and found by node packs through a context variable.

A `ServerContext` holds a server's settings, folders, interrupt flag, start-up stages, model-load figures,
what `/free` should unload, and named slots for state packs keep per server (the loaded-model cache). The
server activates its context in every thread it starts (worker, warm-up) and in its event loop, so the
module-level functions packs call (`paths.current()`, `settings.current()`, `ProgressBar`, ...) resolve to
the server whose prompt is running: two servers in one process share nothing but imported modules.

Code running outside any server (tools, scripts, unit tests) gets a process-wide fallback context, made from
default settings on first use or installed with `use_as_fallback()` (what `paths.configure()` does).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

log = logging.getLogger(__name__)

_active: contextvars.ContextVar["ServerContext | None"] = contextvars.ContextVar("server_context", default=None)
_fallback: "ServerContext | None" = None
_fallback_lock = threading.Lock()


class Timeline:
    """Seconds from process start to each start-up stage of one server, first occurrence only."""

    def __init__(self):
        self._stages: dict[str, float] = {"process_start": 0.0}

    def mark(self, stage: str) -> float:
        from .timeline import PROCESS_START

        if stage not in self._stages:
            self._stages[stage] = round(time.monotonic() - PROCESS_START, 4)
            log.info("startup: %s at %.3f s", stage, self._stages[stage])
        return self._stages[stage]

    def stages(self) -> dict[str, float]:
        return dict(self._stages)


class ServerContext:
    def __init__(self, settings, folders=None):
        from .paths import Folders

        self.settings = settings
        self.folders = folders if folders is not None else Folders.from_settings(settings)
        self.interrupt = threading.Event()
        self.timeline = Timeline()
        self.model_load_seconds: dict[str, float] = {}
        self.unloaders: list = []  # callables that drop loaded models (/free, --disable-smart-memory)
        self._slots: dict[str, object] = {}
        self._slots_lock = threading.Lock()

    def slot(self, name: str, create):
        """Per-server state a pack keeps under `name`, made by `create()` on first use."""
        with self._slots_lock:
            if name not in self._slots:
                self._slots[name] = create()
            return self._slots[name]

    def run(self, function, *args, **kwargs):
        """Calls function with this context active (the target of every thread a server starts)."""
        token = _active.set(self)
        try:
            return function(*args, **kwargs)
        finally:
            _active.reset(token)

    def activate(self) -> contextvars.Token:
        """Makes this context current for the calling task or thread until `deactivate(token)`."""
        return _active.set(self)


def deactivate(token: contextvars.Token) -> None:
    _active.reset(token)


def current() -> ServerContext:
    """The running server's context, or the process fallback outside any server."""
    active = _active.get()
    if active is not None:
        return active
    global _fallback
    with _fallback_lock:
        if _fallback is None:
            from .settings import default_settings

            _fallback = ServerContext(default_settings())
        return _fallback


def use_as_fallback(context: ServerContext) -> ServerContext:
    """Installs the context that code outside any server sees (tools, scripts, unit tests)."""
    global _fallback
    with _fallback_lock:
        _fallback = context
    return context
