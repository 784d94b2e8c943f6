"""The prompt worker: one thread that runs prompts one at a time, and the supervision that keeps it alive.

Nothing a prompt does ends the loop: every failure (an engine bug, `SystemExit` from a node, a failed history
write) fails that prompt with an `execution_error` entry. A prompt's final messages are held until its history
entry is written, because clients read `/history` as soon as they see one. A supervisor on the event loop
restarts a thread that died anyway and tells `/ready` and `/health` when the worker is dead or stuck.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback

from .. import logs, memory
from ..engine import outcomes
from ..engine.executor import Executor, type_name
from .previews import encode_preview

log = logging.getLogger("comfy_serverless")

SUPERVISE_INTERVAL_S = 1.0
IDLE_STUCK_S = 10.0  # pending prompts but no worker tick for this long: the worker is stuck outside a prompt
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5  # a worker that keeps dying is a broken process: stop restarting, fail /health
# Sent only once the history entry is written: clients read /history as soon as they see one of these.
FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class PromptWorker:
    def __init__(self, server_context, queue, hub, metrics, load_class, on_queue_changed):
        self.context = server_context
        self.settings = server_context.settings
        self.queue = queue
        self.hub = hub
        self.metrics = metrics
        self.on_queue_changed = on_queue_changed
        self.executor = Executor(load_class, self.notify, self.settings.cache_mode, self.settings.cache_lru or 0)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, for messages
        self.stopping = False
        self.running_client: str | None = None
        self.executing_node: str | None = None
        self.restarts = 0
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()  # last loop tick, prompt start or engine event
        self._prompt: str | None = None  # the prompt being executed
        self._start_failed = False
        self._gave_up = False
        self._restart_times: list[float] = []
        self._held: list = []  # final messages of the running prompt, released after its history entry
        self._held_lock = threading.Lock()
        self.backend = None  # the ComfyUI backend (backend/backend.py), when one is configured
        self.needs_backend = None  # (prompt) -> bool: whether a prompt has nodes only the backend runs

    # -- the thread --------------------------------------------------------------------------------
    def start(self) -> bool:
        try:
            thread = threading.Thread(target=self.context.run, args=(self._loop_forever,), name="prompt-worker",
                                      daemon=True)
            thread.start()
        except Exception:  # e.g. no more threads: /health reports it until a later try succeeds
            log.error("cannot start the prompt worker:\n%s", traceback.format_exc())
            self._start_failed = True
            return False
        self._thread = thread
        self._start_failed = False
        return True

    def _loop_forever(self) -> None:
        """Takes prompts one at a time; nothing a prompt does (or any step around it) ends this loop."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        while not self.stopping:
            self._beat = time.monotonic()
            try:
                got = self.queue.get(timeout=1.0)
                if got is not None:
                    loop = self._run_prompt(loop, *got)
                self._apply_free_flags()
            except BaseException:  # the loop must survive; a prompt taken here was already ended by _run_prompt
                log.error("prompt worker error (continuing):\n%s", traceback.format_exc())
                time.sleep(0.1)  # no hot spin if the failure repeats

    def _run_prompt(self, loop, item: list, task_id: int):
        """Runs one prompt and always ends it: history entry first, then its final messages. Returns the event
        loop for the next prompt (a new one after a BaseException, which leaves the old one unusable)."""
        prompt_id = item[1]
        started = time.monotonic()
        self._prompt = prompt_id
        self._beat = started
        client = outcomes.client_of(item)
        self.running_client = client
        token = logs.current_prompt.set(prompt_id)
        crash = None
        try:
            self.context.timeline.mark("first_prompt_started")
            log.info("prompt started")
            if self.backend is not None and self.needs_backend(item[2]):
                entry = self.backend.run_blocking(prompt_id, item[2], item[3], item[4], self.notify)
            else:
                entry = loop.run_until_complete(self.executor.execute(prompt_id, item[2], item[3], item[4]))
            if not isinstance(entry, dict):
                raise TypeError(f"the executor returned {type(entry).__name__}, not a history entry")
        except BaseException as exc:  # an engine bug, or SystemExit & co. from a node: fail this prompt only
            log.error("prompt %s crashed the executor:\n%s", prompt_id, traceback.format_exc())
            node_id = self.executing_node
            node = item[2].get(node_id) if node_id and isinstance(item[2], dict) else None
            entry = outcomes.failure_entry(prompt_id, str(exc) or type_name(type(exc)), type_name(type(exc)),
                                           traceback.format_tb(exc.__traceback__), node_id,
                                           node.get("class_type") if isinstance(node, dict) else None)
            crash = outcomes.final_data(entry)
            if not isinstance(exc, Exception):
                loop = _fresh_loop(loop)
        try:
            outcome = outcomes.outcome(entry)
            self.metrics.prompt_finished(outcome, time.monotonic() - started)
            log.info("prompt finished: %s in %.2f s", outcome, time.monotonic() - started)
        except Exception:
            log.error("prompt %s: recording metrics failed:\n%s", prompt_id, traceback.format_exc())
        finally:
            logs.current_prompt.reset(token)
        try:
            self.queue.task_done(task_id, entry, notify=False)
        except BaseException as exc:
            log.error("prompt %s: writing its history entry failed:\n%s", prompt_id, traceback.format_exc())
            failed = outcomes.failure_entry(prompt_id, f"writing the history entry failed: {exc}",
                                            type_name(type(exc)))
            self.queue.fail_running(lambda _item: failed)
            crash = outcomes.final_data(failed)
        held = self._take_held()
        if crash is not None:  # the held messages (if any) no longer tell the outcome
            held = [("execution_error", crash, client)] if client is not None else []
        self._prompt = None
        self.running_client = None
        self.executing_node = None
        try:
            for event, data, sid in held:
                self._post(self.hub.send, event, data, sid)
            self.on_queue_changed()
            if client is not None:
                self._post(self.hub.send, "executing", {"node": None, "prompt_id": prompt_id}, client)
        except Exception:  # e.g. the event loop closed at exit
            log.error("prompt %s: sending its final messages failed:\n%s", prompt_id, traceback.format_exc())
        self.context.timeline.mark("first_prompt_done")
        if self.settings.disable_smart_memory:
            memory.unload_models()
        return loop

    def _take_held(self) -> list:
        with self._held_lock:
            held, self._held = self._held, []
        return held

    def _apply_free_flags(self) -> None:
        flags = self.queue.take_flags()
        if flags.get("unload_models") or flags.get("free_memory"):
            memory.unload_models()
        if flags.get("free_memory"):
            self.executor.reset()
            log.info("caches and models freed")

    # -- engine events (worker thread) -------------------------------------------------------------
    def _post(self, callback, *args) -> None:
        """Runs callback on the server's event loop (messages go out from there)."""
        if self.loop is None:
            raise RuntimeError("the prompt worker runs before the server's event loop is attached")
        self.loop.call_soon_threadsafe(callback, *args)

    def notify(self, event: str, data: dict, sid: str | None) -> None:
        self._beat = time.monotonic()
        if event in FINAL_EVENTS and self._prompt is not None and data.get("prompt_id") == self._prompt:
            with self._held_lock:
                self._held.append((event, data, sid))
            return
        if self._held:  # a held message was not the last one (a blocker's execution_error): keep the order
            for held_event, held_data, held_sid in self._take_held():
                self._post(self.hub.send, held_event, held_data, held_sid)
        if event == "executing":
            self.executing_node = data.get("node")
        if event == "__preview__":
            encoded = encode_preview(data["preview"], self.settings.preview_size)
            if encoded is None:
                return
            meta = data["meta"]
            metadata = {"node_id": data["node_id"], "prompt_id": data["prompt_id"],
                        "display_node_id": meta["display_node"], "parent_node_id": meta["parent_node"],
                        "real_node_id": meta["real_node_id"]}
            self._post(self.hub.send_preview, encoded[0], encoded[1], metadata, sid)
            return
        self._post(self.hub.send, event, data, sid)

    # -- supervision (event loop) ------------------------------------------------------------------
    def supervise(self) -> None:
        """Event-loop timer: restarts a dead worker thread."""
        try:
            self.check()
        except Exception:
            log.error("worker supervision failed:\n%s", traceback.format_exc())
        if not self.stopping and self.loop is not None:
            self.loop.call_later(SUPERVISE_INTERVAL_S, self.supervise)

    def check(self) -> None:
        thread = self._thread
        if self.stopping or self._gave_up or (thread is not None and thread.is_alive()):
            return
        if thread is None and not self._start_failed:
            return  # not started yet
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S]
        if len(self._restart_times) >= MAX_RESTARTS_IN_WINDOW:
            self._gave_up = True
            self._start_failed = True
            log.error("the prompt worker died %d times within %.0f s; no more restarts (/health fails now)",
                      len(self._restart_times), RESTART_WINDOW_S)
            return
        message = "the prompt worker died while running this prompt"
        entries: dict = {}
        orphans = self.queue.fail_running(
            lambda item: entries.setdefault(item[1], outcomes.failure_entry(item[1], message, "WorkerDied")))
        self._take_held()  # they told a story the history no longer does
        for item in orphans:
            log.error("prompt %s failed: %s", item[1], message)
            client = outcomes.client_of(item)
            if client is not None:
                self.hub.send("execution_error", outcomes.final_data(entries[item[1]]), client)
                self.hub.send("executing", {"node": None, "prompt_id": item[1]}, client)
        self._prompt = None
        self.running_client = None
        self.executing_node = None
        self._restart_times.append(now)
        self.restarts += 1
        log.error("the prompt worker thread died; restarting it (restart %d)", self.restarts)
        self.start()

    @property
    def up(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def dead_for_good(self) -> bool:
        """A dead worker that could not be restarted: the process is useless (liveness fails)."""
        return not self.up and self._start_failed

    def seconds_since_progress(self) -> float:
        return max(0.0, time.monotonic() - self._beat)

    def problems(self) -> list[str]:
        """Why the worker cannot take prompts now (for /ready); empty when it is healthy."""
        if self._thread is None and not self._start_failed:
            return []
        if not self.up:
            return ["prompt worker is not running" + (" and could not be restarted" if self._start_failed
                                                      else " (restarting)")]
        quiet = self.seconds_since_progress()
        stall = float(self.settings.worker_stall_timeout or 0)
        running = self._prompt
        if running is not None:
            if stall > 0 and quiet > stall:
                return [f"prompt worker stuck: no progress for {quiet:.0f} s on prompt {running} "
                        f"(--worker-stall-timeout {stall:g})"]
        elif self.queue.pending_count() and quiet > IDLE_STUCK_S:
            return [f"prompt worker stuck: {self.queue.pending_count()} prompt(s) pending but it has not taken "
                    f"one for {quiet:.0f} s"]
        return []


def _fresh_loop(old):
    try:
        old.close()
    except Exception:
        pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop
