"""Loaded models, kept across prompts within a RAM budget and released on /free.

Every loadable network (the UNet, text encoder or VAE of a file, in one dtype) is a `ModelHandle`. The
MODEL / CLIP / VAE objects that travel between nodes hold handles, not modules, so that unloading really
frees the weights even while the engine's output cache still holds those objects: the next use loads the
network again from the file.

Budget: before a load, least-recently-used networks are unloaded until the machine would keep at least
`--reserve-ram` GB available (default 2 GB) after it. A network that does not fit even then is loaded
anyway; the operating system gets the final word.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from .. import context, memory

log = logging.getLogger(__name__)

DEFAULT_RESERVE_GB = 2.0
GIB = 1024 ** 3


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class ModelHandle:
    """One network, loaded on first `get()` and dropped by `unload()`; reloadable any number of times.

    `state` is free for the wrappers' use while the network is loaded (e.g. which LoRA patches are applied);
    it is cleared whenever the network is unloaded.
    """

    def __init__(self, cache: LoadedModels, key: Hashable, description: str, load: Callable, estimated_bytes: int,
                 family: Hashable | None = None):
        self.cache = cache
        self.key = key
        self.family = family
        self.description = description
        self._load = load
        self.estimated_bytes = estimated_bytes
        self.module = None
        self.state: dict = {}
        self.loads = 0
        self.load_lock = threading.Lock()  # one load at a time per network; others may load meanwhile

    @property
    def is_loaded(self) -> bool:
        return self.module is not None

    def get(self):
        return self.cache.acquire(self)

    def prefetch(self) -> None:
        """Starts loading in a background thread, so the load overlaps other work (e.g. text encoding)."""
        if self.module is None:
            # A new thread starts with no context: carry the server's, so the load is recorded with it.
            threading.Thread(target=context.current().run, args=(self.cache.acquire_quietly, self),
                             name="model-prefetch", daemon=True).start()

    def unload(self) -> None:
        self.cache.release(self)

    def __repr__(self) -> str:
        return f"<ModelHandle {self.description} {'loaded' if self.is_loaded else 'unloaded'}>"


class LoadedModels:
    def __init__(self, reserve_bytes: Callable[[], int] | None = None):
        self._handles: OrderedDict[Hashable, ModelHandle] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._reserve_bytes = reserve_bytes or _reserve_from_settings

    def handle(self, key: Hashable, description: str, load: Callable, estimated_bytes: int,
               family: Hashable | None = None) -> ModelHandle:
        """The handle for `key`, created on first request. Handles of the same `family` (same file and
        component) with another key are stale versions (the file changed) and are dropped."""
        with self._lock:
            found = self._handles.get(key)
            if found is not None:
                return found
            if family is not None:
                for stale_key, stale in list(self._handles.items()):
                    if stale.family == family:
                        self._drop(stale)
                        del self._handles[stale_key]
            handle = ModelHandle(self, key, description, load, estimated_bytes, family)
            self._handles[key] = handle
            return handle

    def acquire(self, handle: ModelHandle):
        with self._lock:
            if handle.key in self._handles:
                self._handles.move_to_end(handle.key)
            if handle.module is not None:
                return handle.module
        with handle.load_lock:  # not under the cache lock: other networks can load at the same time
            if handle.module is not None:  # a prefetch finished it meanwhile
                return handle.module
            with self._lock:
                self._make_room(handle.estimated_bytes, keep=handle)
            started = time.perf_counter()
            module = handle._load()
            seconds = time.perf_counter() - started
            with self._lock:
                handle.module = module
                handle.loads += 1
                handle.estimated_bytes = module_bytes(module)
        memory.record_model_load(handle.description, seconds)  # /metrics and the start-up stages
        log.info("loaded %s (%.1f MB) in %.2f s", handle.description, handle.estimated_bytes / 2 ** 20, seconds)
        return module

    def acquire_quietly(self, handle: ModelHandle) -> None:
        """acquire() for prefetching: a failure is logged here and raised again by the real use."""
        try:
            self.acquire(handle)
        except Exception as exc:
            log.warning("prefetching %s failed: %s", handle.description, exc)

    def release(self, handle: ModelHandle) -> None:
        with self._lock:
            self._drop(handle)

    def _drop(self, handle: ModelHandle) -> None:
        if handle.module is not None:
            handle.module = None
            handle.state.clear()
            log.info("unloaded %s", handle.description)

    def _make_room(self, needed: int, keep: ModelHandle) -> None:
        available = available_ram()
        if available is None:
            return
        reserve = self._reserve_bytes()
        for other in list(self._handles.values()):
            if available - needed >= reserve:
                return
            if other is keep or other.module is None:
                continue
            freed = other.estimated_bytes
            self._drop(other)
            log.info("unloaded %s to keep %.1f GB of RAM free", other.description, reserve / GIB)
            available += freed

    def unload_all(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                self._drop(handle)

    def loaded(self) -> list[ModelHandle]:
        with self._lock:
            return [h for h in self._handles.values() if h.module is not None]


def _reserve_from_settings() -> int:
    from .. import settings

    reserve_gb = getattr(settings.current(), "reserve_ram", None)
    return int((DEFAULT_RESERVE_GB if reserve_gb is None else float(reserve_gb)) * GIB)


def loaded_models() -> LoadedModels:
    """The current server's cache; registered with its /free and --disable-smart-memory on first use."""
    server = context.current()

    def create() -> LoadedModels:
        cache = LoadedModels()
        server.unloaders.append(cache.unload_all)
        return cache

    return server.slot("loaded_models", create)


def file_stamp(path: str) -> tuple[str, int, int]:
    """(real path, mtime in ns, size): a changed file gets new cache keys."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_mtime_ns, st.st_size
