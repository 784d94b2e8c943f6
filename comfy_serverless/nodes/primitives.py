"""Primitive value nodes (Int, Float, String, Boolean): a widget whose value feeds other nodes.

Standard library only at module level: the server imports packs to validate prompts before torch is loaded.
ComfyUI defines these as V3 nodes; here they are the same nodes (names, inputs, outputs) in the V1 protocol.
"""

from __future__ import annotations

import sys

CATEGORY = "utils/primitive"


class _Primitive:
    """Returns its single `value` input unchanged."""

    FUNCTION = "execute"
    CATEGORY = CATEGORY

    def execute(self, value):
        return (value,)


class PrimitiveString(_Primitive):
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"multiline": False})}}


class PrimitiveStringMultiline(_Primitive):
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"multiline": True})}}


class PrimitiveInt(_Primitive):
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"min": -sys.maxsize, "max": sys.maxsize,
                                               "control_after_generate": True})}}


class PrimitiveFloat(_Primitive):
    RETURN_TYPES = ("FLOAT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"min": -sys.maxsize, "max": sys.maxsize})}}


class PrimitiveBoolean(_Primitive):
    RETURN_TYPES = ("BOOLEAN",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("BOOLEAN", {})}}


NODE_CLASS_MAPPINGS = {
    "PrimitiveString": PrimitiveString,
    "PrimitiveStringMultiline": PrimitiveStringMultiline,
    "PrimitiveInt": PrimitiveInt,
    "PrimitiveFloat": PrimitiveFloat,
    "PrimitiveBoolean": PrimitiveBoolean,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PrimitiveString": "String",
    "PrimitiveStringMultiline": "String (Multiline)",
    "PrimitiveInt": "Int",
    "PrimitiveFloat": "Float",
    "PrimitiveBoolean": "Boolean",
}
