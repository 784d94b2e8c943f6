"""Where node packs register what `/free`, `--disable-smart-memory` and out-of-memory should release.

The front cannot know what a pack keeps loaded (model weights, say), so packs register callbacks here.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_unloaders: list = []
_load_seconds: dict[str, float] = {}


def on_unload_models(callback) -> None:
    """Registers callback() to drop loaded models; called from the worker thread between prompts."""
    if callback not in _unloaders:
        _unloaders.append(callback)


def unload_models() -> None:
    for callback in list(_unloaders):
        try:
            callback()
        except Exception:
            log.exception("a model unloader failed")


def record_model_load(name: str, seconds: float) -> None:
    """Packs report how long loading a model took (shown in /metrics and the start-up stages)."""
    _load_seconds[name] = seconds
    from . import timeline

    timeline.mark(f"model_loaded:{name}")


def model_load_seconds() -> dict[str, float]:
    return dict(_load_seconds)
