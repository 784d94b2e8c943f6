"""ComfyUI's `comfy_extras.nodes_primitive`: String, StringMultiline, Int, Float and Boolean (the Primitive* nodes)."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.primitives import PrimitiveBoolean as Boolean
from comfy_serverless.nodes.primitives import PrimitiveFloat as Float
from comfy_serverless.nodes.primitives import PrimitiveInt as Int
from comfy_serverless.nodes.primitives import PrimitiveString as String
from comfy_serverless.nodes.primitives import PrimitiveStringMultiline as StringMultiline

NODE_CLASS_MAPPINGS = {
    "PrimitiveString": String,
    "PrimitiveStringMultiline": StringMultiline,
    "PrimitiveInt": Int,
    "PrimitiveFloat": Float,
    "PrimitiveBoolean": Boolean,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
