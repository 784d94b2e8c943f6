"""ComfyUI's `comfy_execution.validation`: the socket type check the engine's validation uses."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.engine.validation import types_match


def _parts(kind) -> set:
    return {part.strip() for part in kind.split(",")} if isinstance(kind, str) else {kind}


def validate_node_input(received_type, input_type, strict: bool = False) -> bool:
    """Whether an output of `received_type` may feed an input of `input_type`: the same type, '*' on either side,
    or comma unions that overlap (with strict, every received type must be accepted)."""
    if not strict:
        return types_match(received_type, input_type)
    if received_type == input_type or received_type == "*" or input_type == "*":
        return True
    accepted = _parts(input_type)
    return "*" in accepted or _parts(received_type) <= accepted


def __getattr__(name: str):
    return missing_attribute(__name__, name)
