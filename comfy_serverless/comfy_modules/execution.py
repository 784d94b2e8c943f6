"""ComfyUI's `execution` for custom node packs: the small values packs read from it.

The executor itself (`PromptExecutor`, `PromptQueue`, `validate_prompt`, `get_input_data`, ...) is this server's
engine (comfy_serverless/engine), which packs reach only through the node protocol; those names are placeholders
here: importing or monkeypatching them at import time works, calling them fails with a clear error.
"""

from __future__ import annotations

import enum

from comfy_execution.validation import validate_node_input  # noqa: F401  (ComfyUI's name, for packs)

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.engine.executor import format_value, type_name
from comfy_serverless.engine.graph import ExecutionBlocker  # noqa: F401

MAXIMUM_HISTORY_SIZE = 10000

__all__ = ["ExecutionBlocker", "ExecutionResult", "CacheType", "MAXIMUM_HISTORY_SIZE", "format_value",
           "full_type_name", "validate_node_input"]


class ExecutionResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1
    PENDING = 2


class CacheType(enum.Enum):
    """The cache modes of ComfyUI's flags (--cache-classic, --cache-lru, --cache-none)."""

    CLASSIC = 0
    LRU = 1
    NONE = 2
    DEPENDENCY_AWARE = 2
    RAM_PRESSURE = 3


def full_type_name(klass: type) -> str:
    """'module.QualName', or just 'QualName' for builtins (how execution_error names exception types)."""
    return type_name(klass)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
