"""The prompt queue and the history, with ComfyUI's ordering and paging rules
(docs/comfy-api-contract.md §1.2-1.3, §3.8)."""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict

HISTORY_LIMIT = 10000
CREDENTIAL_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class PromptQueue:
    """Pending items in a min-heap on (number, prompt_id, ...); one running item at a time.

    `on_change` is called (from whichever thread changed it) after every change, so the server can
    broadcast `status`. Items are 5-lists: [number, prompt_id, prompt, extra_data, outputs_to_execute].
    """

    def __init__(self, on_change=lambda: None):
        self._heap: list = []
        self._running: dict[int, list] = {}
        self._history: OrderedDict[str, dict] = OrderedDict()
        self._cond = threading.Condition()
        self._next_task = 0
        self._on_change = on_change
        self._closed = False
        self.flags: dict = {}

    def put(self, item: list) -> None:
        with self._cond:
            heapq.heappush(self._heap, _HeapEntry(item))
            self._cond.notify()
        self._on_change()

    def put_new(self, item: list) -> bool:
        """Queues the item unless its prompt id is pending, running or in history (checked under the lock)."""
        with self._cond:
            if self._known(item[1]):
                return False
            heapq.heappush(self._heap, _HeapEntry(item))
            self._cond.notify()
        self._on_change()
        return True

    def _known(self, prompt_id: str) -> bool:
        return (prompt_id in self._history or any(item[1] == prompt_id for item in self._running.values())
                or any(entry.item[1] == prompt_id for entry in self._heap))

    def get(self, timeout: float | None = None):
        """Blocks until an item is pending; returns (item, task_id) or None on timeout (or once closed)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._heap and not self._closed, timeout=timeout):
                return None
            item = heapq.heappop(self._heap).item
            task_id = self._next_task
            self._next_task += 1
            try:
                snapshot = _snapshot(item)
            except Exception:  # never lose a dequeued item: keep it unisolated rather than drop it
                snapshot = list(item)
            self._running[task_id] = snapshot
        self._on_change()
        return item, task_id

    def task_done(self, task_id: int, history_entry: dict, notify: bool = True) -> bool:
        """Moves a running item to history; False when it was no longer running (already failed elsewhere)."""
        with self._cond:
            item = self._running.pop(task_id, None)
            if item is None:
                return False
            self._store(item, history_entry)
        if notify:
            self._on_change()
        return True

    def _store(self, item: list, history_entry: dict) -> None:
        try:
            extra = dict(item[3]) if isinstance(item[3], dict) else {}
            for key in CREDENTIAL_KEYS:
                extra.pop(key, None)
            prompt = [item[0], item[1], item[2], extra, item[4]]
        except Exception:  # a malformed item still gets an entry, so its client learns the outcome
            prompt = [None, item[1], {}, {}, []]
        if not isinstance(history_entry, dict):
            history_entry = {"outputs": {}, "meta": {},
                             "status": {"status_str": "error", "completed": False, "messages": []}}
        self._history[item[1]] = {"prompt": prompt, **history_entry}
        while len(self._history) > HISTORY_LIMIT:
            self._history.popitem(last=False)

    def record(self, item: list, history_entry: dict) -> None:
        """Writes a history entry for an item that never ran (dropped at shutdown)."""
        with self._cond:
            self._store(item, history_entry)
        self._on_change()

    def fail_running(self, make_entry) -> list:
        """Moves every running item to history with make_entry(item); returns those items."""
        with self._cond:
            items = list(self._running.values())
            self._running.clear()
            for item in items:
                self._store(item, make_entry(item))
        if items:
            self._on_change()
        return items

    def close(self) -> list:
        """Stops handing out items and removes every pending one; returns them, in queue order."""
        with self._cond:
            self._closed = True
            items = [entry.item for entry in sorted(self._heap)]
            self._heap = []
            self._cond.notify_all()
        if items:
            self._on_change()
        return items

    def running(self) -> list:
        with self._cond:
            return list(self._running.values())

    def pending(self) -> list:
        with self._cond:
            return [entry.item for entry in self._heap]

    def remaining(self) -> int:
        with self._cond:
            return len(self._heap) + len(self._running)

    def pending_count(self) -> int:
        with self._cond:
            return len(self._heap)

    def running_prompt_ids(self) -> list[str]:
        with self._cond:
            return [item[1] for item in self._running.values()]

    def wipe(self) -> None:
        with self._cond:
            self._heap = []
        self._on_change()

    def delete(self, prompt_ids) -> None:
        wanted = set(prompt_ids)
        with self._cond:
            kept = [entry for entry in self._heap if entry.item[1] not in wanted]
            changed = len(kept) != len(self._heap)
            self._heap = kept
            heapq.heapify(self._heap)
        if changed:
            self._on_change()

    def history(self, max_items: int | None = None, offset: int = 0) -> dict:
        with self._cond:
            items = list(self._history.items())
        if offset:
            items = items[offset:]
            if max_items is not None:
                items = items[:max_items]
        elif max_items is not None:
            items = items[-max_items:] if max_items > 0 else []
        return dict(items)

    def history_entry(self, prompt_id: str) -> dict:
        with self._cond:
            entry = self._history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    def clear_history(self) -> None:
        with self._cond:
            self._history.clear()

    def delete_history(self, prompt_ids) -> None:
        with self._cond:
            for prompt_id in prompt_ids:
                self._history.pop(prompt_id, None)

    def set_flag(self, name: str, value) -> None:
        with self._cond:
            self.flags[name] = value
            self._cond.notify()

    def take_flags(self) -> dict:
        with self._cond:
            flags, self.flags = self.flags, {}
        return flags


def _snapshot(item: list) -> list:
    """The item as queued, for /queue and history: the engine writes into node dicts (`is_changed`) and
    validation into `inputs`, so those two levels are copied; values are shared, nothing walks deep data."""
    number, prompt_id, prompt, extra_data, outputs = item
    if isinstance(prompt, dict):
        prompt = {node_id: _copy_node(node) for node_id, node in prompt.items()}
    return [number, prompt_id, prompt, dict(extra_data) if isinstance(extra_data, dict) else extra_data,
            list(outputs) if isinstance(outputs, list) else outputs]


def _copy_node(node):
    if not isinstance(node, dict):
        return node
    copied = dict(node)
    if isinstance(copied.get("inputs"), dict):
        copied["inputs"] = dict(copied["inputs"])
    return copied


class _HeapEntry:
    """Orders by (number, prompt_id) without comparing the prompt dicts."""

    __slots__ = ("item",)

    def __init__(self, item: list):
        self.item = item

    def __lt__(self, other: "_HeapEntry") -> bool:
        return (self.item[0], self.item[1]) < (other.item[0], other.item[1])
