"""ComfyUI's `comfy_extras.nodes_hooks`: the hook nodes (comfy_serverless/nodes/hook_nodes.py and
hook_conditioning.py). Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.hook_conditioning import (
    ConditioningSetDefaultAndCombine,
    ConditioningSetProperties,
    ConditioningSetPropertiesAndCombine,
    PairConditioningCombine,
    PairConditioningSetDefaultAndCombine,
    PairConditioningSetProperties,
    PairConditioningSetPropertiesAndCombine,
)
from comfy_serverless.nodes.hook_nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    CombineHooks,
    CombineHooksEight,
    CombineHooksFour,
    ConditioningTimestepsRange,
    CreateHookKeyframe,
    CreateHookKeyframesFromFloats,
    CreateHookKeyframesInterpolated,
    CreateHookLora,
    CreateHookLoraModelOnly,
    CreateHookModelAsLora,
    CreateHookModelAsLoraModelOnly,
    SetClipHooks,
    SetHookKeyframes,
)

__all__ = [
    "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "CombineHooks", "CombineHooksEight", "CombineHooksFour",
    "ConditioningSetDefaultAndCombine", "ConditioningSetProperties", "ConditioningSetPropertiesAndCombine",
    "ConditioningTimestepsRange", "CreateHookKeyframe", "CreateHookKeyframesFromFloats",
    "CreateHookKeyframesInterpolated", "CreateHookLora", "CreateHookLoraModelOnly", "CreateHookModelAsLora",
    "CreateHookModelAsLoraModelOnly", "PairConditioningCombine", "PairConditioningSetDefaultAndCombine",
    "PairConditioningSetProperties", "PairConditioningSetPropertiesAndCombine", "SetClipHooks", "SetHookKeyframes",
]


def __getattr__(name: str):
    return missing_attribute(__name__, name)
