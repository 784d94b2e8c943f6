"""The prompt queue and the history, with ComfyUI's ordering and paging rules (contract 1.2-1.3, 3.8)."""

from __future__ import annotations

import copy
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
        self.flags: dict = {}

    def put(self, item: list) -> None:
        with self._cond:
            heapq.heappush(self._heap, _HeapEntry(item))
            self._cond.notify()
        self._on_change()

    def get(self, timeout: float | None = None):
        """Blocks until an item is pending; returns (item, task_id) or None on timeout."""
        with self._cond:
            if not self._heap and not self._cond.wait_for(lambda: self._heap, timeout=timeout):
                return None
            item = heapq.heappop(self._heap).item
            task_id = self._next_task
            self._next_task += 1
            self._running[task_id] = copy.deepcopy(item)
        self._on_change()
        return item, task_id

    def task_done(self, task_id: int, history_entry: dict) -> None:
        with self._cond:
            item = self._running.pop(task_id)
            extra = dict(item[3])
            for key in CREDENTIAL_KEYS:
                extra.pop(key, None)
            self._history[item[1]] = {"prompt": [item[0], item[1], item[2], extra, item[4]], **history_entry}
            while len(self._history) > HISTORY_LIMIT:
                self._history.popitem(last=False)
        self._on_change()

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


class _HeapEntry:
    """Orders by (number, prompt_id) without comparing the prompt dicts."""

    __slots__ = ("item",)

    def __init__(self, item: list):
        self.item = item

    def __lt__(self, other: "_HeapEntry") -> bool:
        return (self.item[0], self.item[1]) < (other.item[0], other.item[1])
