"""Progress and interrupt helpers for node packs (the engine side of ComfyUI's ProgressBar).

A node calls `ProgressBar(total).update(1)` while it works; the engine turns that into `progress` and
`progress_state` WebSocket messages for the node that is running, and raises `InterruptProcessingException`
when `/interrupt` was called, so long loops stop between steps.
"""

from __future__ import annotations

import contextvars

from . import context

# Set by the executor around every node call: a callable(value, total, preview) or None.
_reporter: contextvars.ContextVar = contextvars.ContextVar("progress_reporter", default=None)


class InterruptProcessingException(Exception):
    pass


def request_interrupt() -> None:
    """Interrupts the current server's running prompt (each server has its own flag)."""
    context.current().interrupt.set()


def clear_interrupt() -> None:
    context.current().interrupt.clear()


def is_interrupted() -> bool:
    return context.current().interrupt.is_set()


def throw_exception_if_processing_interrupted() -> None:
    interrupt = context.current().interrupt
    if interrupt.is_set():
        interrupt.clear()
        raise InterruptProcessingException()


def set_reporter(reporter) -> contextvars.Token:
    return _reporter.set(reporter)


def reset_reporter(token: contextvars.Token) -> None:
    _reporter.reset(token)


class ProgressBar:
    """`update(n)` / `update_absolute(value, total, preview)`; preview = (format, PIL image, max size)."""

    def __init__(self, total: int, node_id: str | None = None):
        self.total = total
        self.current = 0
        self._reporter = _reporter.get()

    def update_absolute(self, value, total=None, preview=None) -> None:
        throw_exception_if_processing_interrupted()
        if total is not None:
            self.total = total
        self.current = min(value, self.total) if self.total else value
        if self._reporter is not None:
            self._reporter(self.current, self.total, preview)

    def update(self, value) -> None:
        self.update_absolute(self.current + value)
