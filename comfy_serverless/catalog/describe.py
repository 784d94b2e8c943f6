"""Turns a node class into its `/object_info` entry and the facts the engine needs to run it.

V3 classes (comfy_api's ComfyNode, run through the adapter in v3.py) are described from their schema in the
shape ComfyUI gives V3 nodes; everything else is read through the V1 attributes.

The result is plain JSON, so the front can validate prompts and answer `/object_info` from a snapshot
without importing the class. Combo lists read from disk (`paths.FileList`) become `{"__files__": source}`
markers that are filled in at request time.
"""

from __future__ import annotations

import inspect

from ..paths import FileList
from . import v3

FILES_MARKER = "__files__"


def to_json_value(value):
    """Tuples to lists, disk-backed combos to markers, anything else JSON can't hold to its str()."""
    if isinstance(value, FileList) and not value.edited:
        marker: dict = {FILES_MARKER: value.source}
        if value.before:
            marker["before"] = to_json_value(list(value.before))
        if value.after:
            marker["after"] = to_json_value(list(value.after))
        return marker
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _hidden_kind(spec) -> str:
    return spec if isinstance(spec, str) else to_json_value(spec)


def public_info(cls, class_name: str, display_name: str | None, python_module: str) -> dict:
    """The `/object_info` entry, in ComfyUI's key order.  ``display_name`` None is kept: ComfyUI reports null for
    core nodes that declare none (a pack's NODE_DISPLAY_NAME_MAPPINGS entry of None does the same here)."""
    if v3.is_v3(cls):
        return to_json_value(v3.public_info(cls, python_module))
    input_types = cls.INPUT_TYPES()
    inputs: dict = {}
    order: dict = {}
    for category in ("required", "optional", "hidden"):
        if category not in input_types:
            continue
        entries = input_types[category] or {}
        if category == "hidden":
            inputs[category] = {name: _hidden_kind(spec) for name, spec in entries.items()}
        else:
            inputs[category] = {name: to_json_value(spec) for name, spec in entries.items()}
        order[category] = list(entries.keys())
    outputs = list(getattr(cls, "RETURN_TYPES", ()))
    info = {
        "input": inputs,
        "input_order": order,
        "output": to_json_value(outputs),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(outputs)),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or outputs),
        "name": class_name,
        "display_name": display_name,
        "description": getattr(cls, "DESCRIPTION", "") or "",
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", None) or python_module,
        "category": getattr(cls, "CATEGORY", "sd") or "sd",
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    if getattr(cls, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(cls, "EXPERIMENTAL", False):
        info["experimental"] = True
    if hasattr(cls, "API_NODE"):
        info["api_node"] = bool(cls.API_NODE)
    return info


def _extra_output_type(cls):
    """The type a RETURN_TYPES answers beyond its length, for packs whose nodes have a variable number of outputs
    (Impact's and Inspire's ByPassTypeTuple answer item 0 for any slot); None for a plain tuple."""
    outputs = getattr(cls, "RETURN_TYPES", ())
    if type(outputs) in (tuple, list):
        return None
    try:
        return to_json_value(outputs[len(outputs)])
    except Exception:
        return None


def execution_facts(cls) -> dict:
    """What validation and scheduling need to know about the class without importing it again."""
    facts = {
        "input_is_list": bool(getattr(cls, "INPUT_IS_LIST", False)),
        "not_idempotent": bool(getattr(cls, "NOT_IDEMPOTENT", False)),
        "has_is_changed": callable(getattr(cls, "IS_CHANGED", None)),
        "is_async": inspect.iscoroutinefunction(getattr(cls, getattr(cls, "FUNCTION", ""), None)),
        "validate_inputs": None,
        "extra_output_type": _extra_output_type(cls),
    }
    validator = getattr(cls, "VALIDATE_INPUTS", None)
    if callable(validator):
        params = inspect.signature(validator).parameters
        facts["validate_inputs"] = {
            "params": [n for n, p in params.items()
                       if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)],
            "var_keyword": any(p.kind == p.VAR_KEYWORD for p in params.values()),
        }
    return facts
