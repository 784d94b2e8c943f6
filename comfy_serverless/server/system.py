"""`/system_stats` without importing torch: versions from package metadata, memory from the OS."""

from __future__ import annotations

import os
import sys

from .. import __version__

COMFYUI_VERSION = "0.3.64"  # the ComfyUI release whose API this server follows
FRONTEND_VERSION = "1.27.10"
TEMPLATES_VERSION = "0.1.95"
HEAVY_MODULES = ("torch", "numpy", "PIL")
_package_versions: dict[str, str | None] = {}


def package_version(name: str) -> str | None:
    if name not in _package_versions:
        from importlib import metadata  # ~10 ms: only on the first /system_stats, never at start

        try:
            _package_versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            _package_versions[name] = None
    return _package_versions[name]


def memory() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo; falls back to sysconf."""
    try:
        values = {}
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                key, _, rest = line.partition(b":")
                if key in (b"MemTotal", b"MemAvailable"):
                    values[key] = int(rest.split()[0]) * 1024
        return values[b"MemTotal"], values[b"MemAvailable"]
    except (OSError, KeyError, ValueError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, os.sysconf("SC_AVPHYS_PAGES") * size


def rss_bytes() -> int:
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def system_stats(app) -> dict:
    total, free = memory()
    return {
        "system": {
            "os": os.name, "ram_total": total, "ram_free": free, "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": FRONTEND_VERSION, "installed_templates_version": None,
            "required_templates_version": TEMPLATES_VERSION, "python_version": sys.version,
            "pytorch_version": package_version("torch") or "not installed", "embedded_python": False,
            "argv": sys.argv,
        },
        "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
                     "torch_vram_total": total, "torch_vram_free": free}],
        "comfy_serverless": {
            "version": __version__,
            "startup": app.context.timeline.stages(),
            "warmup": {"mode": app.settings.warmup, "state": app.catalogs.state},
            "catalog": {"nodes": len(app.catalog) if app.catalog else 0, "stale": app.catalogs.stale},
            "heavy_modules_loaded": [m for m in HEAVY_MODULES if m in sys.modules],
            "rss_bytes": rss_bytes(),
            "cache_mode": app.settings.cache_mode,
            "backend": _backend(app),
        },
    }


def _backend(app) -> dict | None:
    """The ComfyUI backend's state and boot time (None when none is configured)."""
    if app.backend is None:
        return None
    return {**app.backend.describe(), "nodes": app.catalog.backend_nodes if app.catalog else 0}
