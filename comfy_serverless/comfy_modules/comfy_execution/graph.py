"""ComfyUI's `comfy_execution.graph`: the execution blocker and the live prompt graph (DYNPROMPT) of our engine."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.engine.graph import (  # noqa: F401  (ComfyUI's names, for packs)
    DependencyCycleError,
    DynamicPrompt,
    ExecutionBlocker,
    NodeNotFoundError,
)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
