"""The prompt as a live graph: links, ephemeral nodes added by expansion, and the blocker value."""

from __future__ import annotations


def is_link(value) -> bool:
    """A link is a two-element list [source node id (str), output slot (int)]."""
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


class ExecutionBlocker:
    """Returned by a node (whole or per output) to block everything downstream of it.

    With a message, the first node that hits the blocker reports it as an `execution_error` message, but the
    prompt still succeeds; without one, downstream nodes are skipped silently.
    """

    def __init__(self, message: str | None):
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


class DependencyCycleError(Exception):
    pass


class DuplicateNodeError(Exception):
    pass


class NodeNotFoundError(Exception):
    pass


class DynamicPrompt:
    """The submitted prompt plus the ephemeral nodes that expansion adds while it runs."""

    def __init__(self, prompt: dict):
        self.original = prompt
        self.ephemeral: dict[str, dict] = {}
        self.parents: dict[str, str] = {}
        self.display: dict[str, str] = {}

    def get_node(self, node_id: str) -> dict:
        if node_id in self.ephemeral:
            return self.ephemeral[node_id]
        if node_id in self.original:
            return self.original[node_id]
        raise NodeNotFoundError(f"Node {node_id} not found")

    def has_node(self, node_id: str) -> bool:
        return node_id in self.original or node_id in self.ephemeral

    def add_ephemeral_node(self, node_id: str, node: dict, parent_id: str, display_id: str) -> None:
        self.ephemeral[node_id] = node
        self.parents[node_id] = parent_id
        self.display[node_id] = display_id

    def get_real_node_id(self, node_id: str) -> str:
        while node_id in self.parents:
            node_id = self.parents[node_id]
        return node_id

    def get_parent_node_id(self, node_id: str) -> str | None:
        return self.parents.get(node_id)

    def get_display_node_id(self, node_id: str) -> str:
        while node_id in self.display:
            node_id = self.display[node_id]
        return node_id

    def all_node_ids(self) -> set[str]:
        return set(self.original) | set(self.ephemeral)

    def get_original_prompt(self) -> dict:
        return self.original

    def is_ephemeral(self, node_id: str) -> bool:
        return node_id in self.ephemeral

    def meta(self, node_id: str) -> dict:
        return {"node_id": node_id, "display_node": self.get_display_node_id(node_id),
                "parent_node": self.get_parent_node_id(node_id), "real_node_id": self.get_real_node_id(node_id)}
