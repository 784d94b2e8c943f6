"""Helpers for node packs that expand into subgraphs (ComfyUI's GraphBuilder id convention).

Before each call of a node function the executor sets the default prefix to `<node id>.<call index>.`;
every builder made during that call gets `<prefix><k>.` (k = 0, 1, ...) and numbers its nodes 1, 2, ...,
so expanded ids such as `12.0.0.3` are unique and deterministic.
"""

from __future__ import annotations

import contextvars

from .engine.graph import ExecutionBlocker, is_link  # noqa: F401  (re-exported for node packs)

_prefix: contextvars.ContextVar[tuple[str, list[int]] | None] = contextvars.ContextVar("graph_prefix",
                                                                                     default=None)


def set_default_prefix(node_id: str, call_index: int) -> None:
    _prefix.set((f"{node_id}.{call_index}.", [0]))


class GraphBuilder:
    def __init__(self, prefix: str | None = None):
        if prefix is None:
            current = _prefix.get()
            if current is None:
                prefix = ""
            else:
                base, counter = current
                prefix = f"{base}{counter[0]}."
                counter[0] += 1
        self.prefix = prefix
        self.nodes: dict[str, "Node"] = {}
        self._next_id = 1

    def node(self, class_type: str, id: str | None = None, **inputs) -> "Node":
        if id is None:
            id = str(self._next_id)
            self._next_id += 1
        full_id = self.prefix + id
        node = Node(full_id, class_type, inputs)
        self.nodes[full_id] = node
        return node

    def lookup_node(self, id: str) -> "Node | None":
        return self.nodes.get(self.prefix + id)

    def finalize(self) -> dict:
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}


class Node:
    def __init__(self, node_id: str, class_type: str, inputs: dict):
        self.id = node_id
        self.class_type = class_type
        self.inputs = dict(inputs)
        self.override_display_id: str | None = None

    def out(self, index: int) -> list:
        return [self.id, index]

    def set_input(self, name: str, value) -> None:
        if value is None:
            self.inputs.pop(name, None)
        else:
            self.inputs[name] = value

    def get_input(self, name: str):
        return self.inputs.get(name)

    def set_override_display_id(self, display_id: str) -> None:
        self.override_display_id = display_id

    def serialize(self) -> dict:
        data = {"class_type": self.class_type,
                "inputs": {k: v.out(0) if isinstance(v, Node) else v for k, v in self.inputs.items()}}
        if self.override_display_id is not None:
            data["override_display_id"] = self.override_display_id
        return data
