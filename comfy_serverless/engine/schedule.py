"""Which node runs next: the topological "dissolve" of docs/comfy-api-contract.md §3.2.

Nodes are staged on demand: adding an output pulls in, transitively, the sources of its non-lazy links that
have no result yet. A node is ready when nothing it waits on is unfinished; among ready nodes, outputs and
async nodes go first, then nodes feeding an output, then nodes two steps from one, then the oldest.
"""

from __future__ import annotations

import asyncio

from .graph import DependencyCycleError, is_link


class ExecutionList:
    def __init__(self, dynprompt, has_result, input_options, is_output, is_async):
        """has_result(id) -> bool; input_options(id, name) -> dict|None; is_output / is_async(id) -> bool."""
        self.dynprompt = dynprompt
        self.has_result = has_result
        self.input_options = input_options
        self.is_output = is_output
        self.is_async = is_async
        self.pending: dict[str, None] = {}  # insertion-ordered set
        self.waits_on: dict[str, set[str]] = {}
        self.blocking: dict[str, set[str]] = {}
        self.external: dict[str, int] = {}
        self._unblocked = asyncio.Event()

    def is_empty(self) -> bool:
        return not self.pending

    def add_node(self, node_id: str, include_lazy: bool = False) -> None:
        if node_id in self.pending:
            return
        self.pending[node_id] = None
        self.waits_on.setdefault(node_id, set())
        inputs = self.dynprompt.get_node(node_id).get("inputs", {})
        for name, value in inputs.items():
            if not is_link(value):
                continue
            options = self.input_options(node_id, name) or {}
            if options.get("lazy") and not include_lazy:
                continue
            if not self.has_result(value[0]):
                self.add_strong_link(value[0], node_id)

    def add_strong_link(self, from_id: str, to_id: str) -> None:
        if not self.dynprompt.has_node(from_id):
            from .graph import NodeNotFoundError

            raise NodeNotFoundError(f"Node {from_id} not found (linked from node {to_id})")
        self.add_node(from_id)
        self.waits_on.setdefault(to_id, set()).add(from_id)
        self.blocking.setdefault(from_id, set()).add(to_id)

    def make_input_strong_link(self, node_id: str, input_name: str) -> None:
        value = self.dynprompt.get_node(node_id)["inputs"][input_name]
        if is_link(value) and not self.has_result(value[0]):
            self.add_strong_link(value[0], node_id)

    def add_external_block(self, node_id: str):
        """Keeps node_id unready until the returned function is called (used for async node tasks)."""
        self.external[node_id] = self.external.get(node_id, 0) + 1

        def unblock():
            self.external[node_id] -= 1
            self._unblocked.set()

        return unblock

    def _ready(self) -> list[str]:
        return [n for n in self.pending if not self.waits_on.get(n) and not self.external.get(n)]

    def _pick(self, ready: list[str]) -> str:
        for node_id in ready:
            if self.is_output(node_id) or self.is_async(node_id):
                return node_id
        for node_id in ready:
            if any(self.is_output(b) for b in self.blocking.get(node_id, ())):
                return node_id
        for node_id in ready:
            for b in self.blocking.get(node_id, ()):
                if any(self.is_output(bb) for bb in self.blocking.get(b, ())):
                    return node_id
        return ready[0]

    async def next_node(self) -> str:
        """The next node to run; waits for async tasks; raises DependencyCycleError when stuck."""
        while True:
            ready = self._ready()
            if ready:
                return self._pick(ready)
            if any(count > 0 for count in self.external.values()):
                self._unblocked.clear()
                await self._unblocked.wait()
                continue
            raise DependencyCycleError(self._blame_for_cycle())

    def complete(self, node_id: str) -> None:
        self.pending.pop(node_id, None)
        self.waits_on.pop(node_id, None)
        for waiting in self.blocking.pop(node_id, set()):
            self.waits_on.get(waiting, set()).discard(node_id)

    def _blame_for_cycle(self) -> str:
        """The display id of the first expanded node among the stuck ones (the node that made the cycle)."""
        stuck = list(self.pending)
        for node_id in stuck:
            display = self.dynprompt.get_display_node_id(node_id)
            if display != node_id:
                return display
        return stuck[0]
