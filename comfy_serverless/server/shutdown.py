"""SIGTERM: refuse new prompts, let queued and running ones finish within the grace period, then end the rest.

Pending prompts left at the end get an `execution_error` history entry ("server shut down before the prompt
ran") and message; the running one is interrupted (and recorded as interrupted if it does not stop). The
exit status is 1 when any prompt did not finish, 0 otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..engine import outcomes

log = logging.getLogger("comfy_serverless")

DRAIN_INTERRUPT_WAIT_S = 10.0
SHUTDOWN_MESSAGE = "server shut down before the prompt ran"


async def drain(app) -> int:
    """Runs on the event loop after SIGTERM with `app.draining` set; returns the process exit status."""
    queue = app.queue
    grace = max(0.0, float(app.settings.shutdown_grace))
    log.info("shutting down: %d prompt(s) left, waiting up to %.0f s", queue.remaining(), grace)
    deadline = time.monotonic() + grace
    while queue.remaining() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not queue.remaining():
        return 0
    dropped = queue.close()  # the worker takes nothing more
    for item in dropped:
        entry = outcomes.failure_entry(item[1], SHUTDOWN_MESSAGE, "ServerShutdown")
        queue.record(item, entry)
        _tell_client(app.hub, item, "execution_error", outcomes.final_data(entry))
    running = queue.running_prompt_ids()
    ids = ", ".join(item[1] for item in dropped)
    if running:
        log.warning("grace period over: interrupted the running prompt, dropped %d pending%s", len(dropped),
                    f" ({ids})" if ids else "")
    else:
        log.warning("grace period over: dropped %d pending (%s)", len(dropped), ids)
    end = time.monotonic() + DRAIN_INTERRUPT_WAIT_S
    while queue.running() and time.monotonic() < end:
        # Again each time: a prompt dequeued just before close() clears the flag when it starts.
        app.context.interrupt.set()
        await asyncio.sleep(0.05)
    entries: dict = {}
    for item in queue.fail_running(lambda item: entries.setdefault(item[1], outcomes.interrupted_entry(item[1]))):
        log.warning("prompt %s did not stop within %.0f s of the interrupt; recorded as interrupted",
                    item[1], DRAIN_INTERRUPT_WAIT_S)
        _tell_client(app.hub, item, "execution_interrupted", outcomes.final_data(entries[item[1]]))
    interrupted = [pid for pid in running
                   if outcomes.outcome(queue.history_entry(pid).get(pid) or {}) != "success"]
    if interrupted:
        log.warning("interrupted at shutdown: %s", ", ".join(interrupted))
    return 1 if dropped or interrupted else 0


def _tell_client(hub, item: list, event: str, data: dict) -> None:
    client = outcomes.client_of(item)
    if client is not None:
        hub.send(event, data, client)
