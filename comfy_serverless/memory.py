"""Where node packs register what `/free`, `--disable-smart-memory` and out-of-memory should release.

The front cannot know what a pack keeps loaded (model weights, say), so packs register callbacks here, with
the server whose prompt is running (`context.current()`).
"""

from __future__ import annotations

import logging

from . import context

log = logging.getLogger(__name__)


def on_unload_models(callback) -> None:
    """Registers callback() to drop loaded models; called from the worker thread between prompts."""
    unloaders = context.current().unloaders
    if callback not in unloaders:
        unloaders.append(callback)


def unload_models() -> None:
    for callback in list(context.current().unloaders):
        try:
            callback()
        except Exception:
            log.exception("a model unloader failed")


def record_model_load(name: str, seconds: float) -> None:
    """Packs report how long loading a model took (shown in /metrics and the start-up stages)."""
    server = context.current()
    server.model_load_seconds[name] = seconds
    server.timeline.mark(f"model_loaded:{name}")


def model_load_seconds() -> dict[str, float]:
    return dict(context.current().model_load_seconds)
