"""`comfy-serverless snapshot --comfyui DIR` (or --comfyui-url): the backend's /object_info into the snapshot.

Run at image build time, so a server starts with the union catalogue without starting ComfyUI. Skipped when the
stored part's fingerprint (ComfyUI version and custom_nodes files) still matches.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import context
from ..catalog import snapshot

log = logging.getLogger("comfy_serverless")


def write_backend_snapshot(settings) -> int:
    path = snapshot.backend_path(settings.catalog_file)
    fingerprint = snapshot.comfyui_fingerprint(settings.comfyui, settings.comfyui_url)
    existing = snapshot.load_backend(settings.catalog_file)
    if existing is not None and existing.get("fingerprint") == fingerprint and settings.comfyui:
        log.info("ComfyUI backend catalogue up to date: %s", path)
        return 0
    started = time.monotonic()
    info, version, error = asyncio.run(_fetch(settings))
    if info is None:
        log.error("ComfyUI backend catalogue not written: %s", error)
        return 1
    snapshot.save(snapshot.backend_part(fingerprint, version, info, time.monotonic() - started), path)
    log.info("ComfyUI backend catalogue: %d nodes (ComfyUI %s) in %.2f s -> %s", len(info), version or "?",
             time.monotonic() - started, path)
    return 0


async def _fetch(settings):
    from .backend import Backend

    found: list[dict] = []
    backend = Backend(context.ServerContext(settings), None, found.append)
    backend.attach(asyncio.get_running_loop())
    try:
        await backend.wait_up()
        while not found and backend.state == "up":  # the live catalogue is read right after the boot
            await asyncio.sleep(0.05)
    except ConnectionError as exc:
        return None, None, str(exc)
    finally:
        await backend.stop()
    return (found[0], backend.version, None) if found else (None, None, backend.last_error or "no /object_info")
