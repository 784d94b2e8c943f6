"""Result caches between prompts, keyed by an input signature (docs/comfy-api-contract.md §3.3).

A node's signature is its own entry followed by its ancestors' entries (depth-first over sorted input
names), so identical sub-graphs under different ids share results. An entry holds the class, the
IS_CHANGED value, the node id when the class asks for it, and each input as a literal or as a reference to
an ancestor's position and output slot.
"""

from __future__ import annotations

from collections import OrderedDict

from .graph import is_link


class Unmatchable:
    """Stands in for values that must never equal anything: NaN fingerprints, non-JSON objects."""

    __slots__ = ()


def hashable(value):
    if isinstance(value, bool):
        return ("bool", value)
    if value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):  # tagged: 5 and 5.0 are different inputs (5 == 5.0 in Python)
        return ("float", value) if value == value else Unmatchable()
    if isinstance(value, (list, tuple)):
        return ("list",) + tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted(((str(k), hashable(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    return Unmatchable()


def signature(dynprompt, node_id: str, entry_extras) -> tuple:
    """entry_extras(node_id) -> (is_changed value, include node id?) for one node."""
    order = [node_id]
    position = {node_id: 0}
    stack = [node_id]
    while stack:  # depth-first, iterative so deep graphs cannot overflow the interpreter stack
        current = stack.pop()
        inputs = dynprompt.get_node(current).get("inputs", {})
        children = []
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value) and value[0] not in position and dynprompt.has_node(value[0]):
                position[value[0]] = len(order)
                order.append(value[0])
                children.append(value[0])
        stack.extend(reversed(children))
    entries = []
    for nid in order:
        node = dynprompt.get_node(nid)
        is_changed, with_id = entry_extras(nid)
        inputs = node.get("inputs", {})
        items = []
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value) and value[0] in position:
                items.append((name, ("ANCESTOR", position[value[0]], value[1])))
            else:
                items.append((name, hashable(value)))
        entries.append((node.get("class_type"), hashable(is_changed), nid if with_id else None, tuple(items)))
    return tuple(entries)


class ResultCache:
    """Outputs and UI results by signature, under one of the three policies."""

    def __init__(self, mode: str = "classic", lru_size: int = 0):
        self.mode = mode
        self.lru_size = lru_size
        self.outputs: OrderedDict = OrderedDict()
        self.ui: dict = {}
        self._generation = 0
        self._used_in: dict = {}

    def start_prompt(self, keys_in_prompt: set) -> None:
        self._generation += 1
        if self.mode == "none":
            self.clear()
        elif self.mode == "classic":
            for key in [k for k in self.outputs if k not in keys_in_prompt]:
                self._drop(key)
        for key in keys_in_prompt:
            if key in self.outputs:
                self._touch(key)

    def get(self, key):
        if key is None or key not in self.outputs:
            return None
        self._touch(key)
        return self.outputs[key]

    def get_ui(self, key):
        return self.ui.get(key)

    def put(self, key, outputs, ui) -> None:
        if key is None or self.mode == "none":
            return
        self.outputs[key] = outputs
        if ui is not None:
            self.ui[key] = ui
        else:
            self.ui.pop(key, None)
        self._touch(key)
        if self.mode == "lru":
            self._evict()

    def clear(self) -> None:
        self.outputs.clear()
        self.ui.clear()
        self._used_in.clear()

    def __len__(self) -> int:
        return len(self.outputs)

    def _touch(self, key) -> None:
        self._used_in[key] = self._generation
        self.outputs.move_to_end(key)

    def _drop(self, key) -> None:
        self.outputs.pop(key, None)
        self.ui.pop(key, None)
        self._used_in.pop(key, None)

    def _evict(self) -> None:
        # Least recently used first, but never what the running prompt already used.
        for key in list(self.outputs):
            if len(self.outputs) <= self.lru_size:
                break
            if self._used_in.get(key) != self._generation:
                self._drop(key)
