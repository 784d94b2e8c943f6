"""ComfyUI's `comfy_execution.graph_utils`: subgraph building for node expansion (comfy_serverless.graph_utils)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.graph_utils import ExecutionBlocker, GraphBuilder, Node, is_link  # noqa: F401


def add_graph_prefix(graph: dict, outputs, prefix: str) -> tuple[dict, tuple]:
    """Prefixes every node id of an expansion graph (and the links between them and in `outputs`)."""
    def relink(value):
        return [prefix + value[0], value[1]] if is_link(value) else value

    prefixed = {}
    for node_id, node in graph.items():
        inputs = {name: relink(value) for name, value in node.get("inputs", {}).items()}
        prefixed[prefix + node_id] = {**node, "inputs": inputs}
    return prefixed, tuple(relink(value) for value in outputs)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
