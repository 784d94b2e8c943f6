"""V3 nodes (`comfy_api.latest.io.ComfyNode`) run by the V1 engine (docs/comfy-api-contract.md §2.4).

A V3 node describes itself with `define_schema()` and runs through classmethods (`execute`, `validate_inputs`,
`fingerprint_inputs`, `check_lazy_status`). `adapt()` turns such a class into a plain V1 class (INPUT_TYPES,
RETURN_TYPES, FUNCTION, VALIDATE_INPUTS, IS_CHANGED, ...) so the engine treats both kinds the same way, and
`public_info()` writes the `/object_info` entry in the shape ComfyUI gives its V3 nodes (every key present,
combos as `["COMBO", {"options": [...], ...}]`, hidden inputs as `{"unique_id": ["UNIQUE_ID"]}`).

The schema objects come from the `comfy_api` face (comfy_serverless/comfy_modules/comfy_api); this module
only reads them through their small protocol (`inputs[i].id/.optional/.get_io_type()/.as_dict()`,
`outputs[i].io_type/.display_name/.tooltip/.is_output_list`, `hidden[i].name/.value`, the schema's flags),
so nothing here imports the ComfyUI module names.

Differences from a V1 class that matter to the engine:
- hidden values reach `execute` as `cls.hidden.<name>` on a per-call subclass, never as arguments; the adapter
  asks the engine for them under prefixed names so they cannot collide with an input of the same name;
- V3 combos have the string type "COMBO", so validation checks no list membership for them (as ComfyUI);
- a V3 class always has `check_lazy_status` (the default asks for every input that is still None), so lazy
  inputs are evaluated unless the node overrides it;
- returns are normalised from `NodeOutput` (or a tuple, dict, None or ExecutionBlocker) to the V1 shapes.
"""

from __future__ import annotations

import inspect

from ..engine.graph import ExecutionBlocker

HIDDEN_PREFIX = "__v3_hidden__"  # engine-side name of a hidden input: the prefix + its lower-case name
HIDDEN_NAMES = ("unique_id", "prompt", "extra_pnginfo", "dynprompt", "auth_token_comfy_org", "api_key_comfy_org")


class HiddenHolder:
    """What `cls.hidden` holds while a V3 node runs; any hidden value the node did not ask for is None."""

    def __init__(self, unique_id=None, prompt=None, extra_pnginfo=None, dynprompt=None,
                 auth_token_comfy_org=None, api_key_comfy_org=None, **others):
        self.unique_id = unique_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        self.dynprompt = dynprompt
        self.auth_token_comfy_org = auth_token_comfy_org
        self.api_key_comfy_org = api_key_comfy_org
        for name, value in others.items():
            setattr(self, name, value)

    def __getattr__(self, name: str):  # only reached for names never set
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return None

    @classmethod
    def from_dict(cls, values: dict | None) -> "HiddenHolder":
        """From `{kind or name: value}`, e.g. {"UNIQUE_ID": "5"} or {Hidden.unique_id: "5"}."""
        holder = cls()
        for key, value in (values or {}).items():
            setattr(holder, _hidden_name(key), value)
        return holder


def _hidden_name(key) -> str:
    """'unique_id' for Hidden.unique_id, "UNIQUE_ID" or "unique_id"."""
    name = getattr(key, "name", None)
    if isinstance(name, str) and name:
        return name
    return str(key).lower()


def _hidden_kind(member) -> str:
    value = getattr(member, "value", member)
    return str(value)


# -- recognising and describing V3 classes ---------------------------------------------------------------------

def is_v3(cls) -> bool:
    """A V3 node class (or its adapter)."""
    if not isinstance(cls, type):
        return False
    if "V3_CLASS" in cls.__dict__:
        return True
    return callable(getattr(cls, "define_schema", None)) and callable(getattr(cls, "execute", None))


def v3_class(cls):
    """The pack's own V3 class behind an adapter (or the class itself)."""
    return cls.__dict__.get("V3_CLASS", cls)


def schema_of(cls):
    """The finalised, checked schema (define_schema is called every time: combo lists stay live)."""
    cls = v3_class(cls)
    schema = cls.define_schema()
    if schema is None:
        raise TypeError(f"{cls.__name__}.define_schema() returned None")
    finalize = getattr(schema, "finalize", None)
    if callable(finalize):
        finalize()
    check = getattr(schema, "validate", None)
    if callable(check):
        check()
    return schema


def _inputs(schema, hidden_form: str) -> dict:
    """INPUT_TYPES from a schema. hidden_form 'public' -> {"unique_id": ("UNIQUE_ID",)} (what /object_info
    shows); 'engine' -> {HIDDEN_PREFIX + "unique_id": "UNIQUE_ID"} (what the executor fills in)."""
    result: dict = {"required": {}}
    for item in schema.inputs or ():
        options = dict(item.as_dict())
        options.pop("optional", None)
        result.setdefault("optional" if item.optional else "required", {})[item.id] = (item.get_io_type(), options)
    for member in schema.hidden or ():
        name, kind = _hidden_name(member), _hidden_kind(member)
        if hidden_form == "public":
            result.setdefault("hidden", {})[name] = (kind,)
        else:
            result.setdefault("hidden", {})[HIDDEN_PREFIX + name] = kind
    return result


def _outputs(schema) -> tuple[list, list, list, list]:
    types, names, is_list, tooltips = [], [], [], []
    for item in schema.outputs or ():
        io_type = item.get_io_type() if callable(getattr(item, "get_io_type", None)) else item.io_type
        types.append(io_type)
        names.append(item.display_name or io_type)
        is_list.append(bool(item.is_output_list))
        tooltips.append(item.tooltip or None)
    return types, names, is_list, tooltips


def public_info(cls, python_module: str) -> dict:
    """The `/object_info` entry, keys in ComfyUI's order for V3 nodes (all of them always present)."""
    schema = schema_of(cls)
    inputs = _inputs(schema, "public")
    types, names, is_list, tooltips = _outputs(schema)
    own = v3_class(cls)
    return {
        "input": inputs,
        "input_order": {category: list(entries) for category, entries in inputs.items()},
        "output": types,
        "output_is_list": is_list,
        "output_name": names,
        "output_tooltips": tooltips,
        "name": schema.node_id,
        "display_name": schema.display_name,
        "description": schema.description or "",
        "python_module": (getattr(cls, "RELATIVE_PYTHON_MODULE", None) or getattr(own, "RELATIVE_PYTHON_MODULE", None)
                          or python_module),
        "category": schema.category or "sd",
        "output_node": bool(schema.is_output_node),
        "deprecated": bool(schema.is_deprecated),
        "experimental": bool(schema.is_experimental),
        "api_node": bool(schema.is_api_node),
    }


def node_id(cls) -> str:
    return schema_of(cls).node_id


# -- the V1 adapter ---------------------------------------------------------------------------------------------

def overrides(cls, name: str) -> bool:
    """Whether a V3 class defines `name` itself rather than inheriting the base's placeholder (the base marks
    its placeholders with `_v3_default`)."""
    attribute = inspect.getattr_static(cls, name, None)
    if attribute is None:
        return False
    function = getattr(attribute, "__func__", attribute)
    return not getattr(function, "_v3_default", False)


def _clone(cls, hidden: HiddenHolder):
    """A per-call subclass carrying `hidden`, so a node that sets class attributes while running changes
    nothing shared (ComfyUI runs V3 nodes on a clone of the class for the same reason)."""
    return type(cls.__name__, (cls,), {"hidden": hidden, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _split_hidden(kwargs: dict) -> tuple[HiddenHolder, dict]:
    hidden, inputs = {}, {}
    for key, value in kwargs.items():
        if key.startswith(HIDDEN_PREFIX):
            hidden[key[len(HIDDEN_PREFIX):]] = value
        else:
            inputs[key] = value
    return HiddenHolder(**hidden), inputs


def _with_cls_signature(function, source):
    """Gives `function(cls, **kwargs)` the parameters of the V3 classmethod `source`, so the engine sees
    which inputs VALIDATE_INPUTS / IS_CHANGED name (it reads their signatures)."""
    try:
        params = list(inspect.signature(source).parameters.values())
    except (TypeError, ValueError):
        return function
    first = inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    function.__signature__ = inspect.Signature([first, *params])
    return function


def _ui_dict(ui) -> dict | None:
    if ui is None:
        return None
    if callable(getattr(ui, "as_dict", None)):
        ui = ui.as_dict()
    if not isinstance(ui, dict):
        raise TypeError(f"a node's ui must be a dict or a UI output object, not {type(ui).__name__}")
    # ComfyUI's helpers use tuples (e.g. {"animated": (True,)}); the engine merges lists
    return {key: list(value) if isinstance(value, tuple) else value for key, value in ui.items()}


def normalize_output(result, cls, schema_flags: dict):
    """A V3 return value -> what a V1 FUNCTION returns: a dict with result/ui/expand, or an ExecutionBlocker."""
    if result is None:
        return {"result": ()}
    if isinstance(result, ExecutionBlocker):
        return ExecutionBlocker(result.message)
    if isinstance(result, tuple):
        return {"result": result}
    if isinstance(result, dict):
        out = dict(result)
        if isinstance(out.get("result"), ExecutionBlocker):
            return ExecutionBlocker(out["result"].message)
        if "ui" in out:
            out["ui"] = _ui_dict(out["ui"])
            if out["ui"] is None:
                del out["ui"]
        if "result" in out and not isinstance(out["result"], tuple):
            out["result"] = tuple(out["result"]) if isinstance(out["result"], list) else (out["result"],)
        out.setdefault("result", ())
        if "expand" in out and not schema_flags.get("enable_expand"):
            raise ValueError(f"node {cls.__name__} returned 'expand' but its schema does not set enable_expand=True")
        return out
    if hasattr(result, "args") and hasattr(result, "block_execution"):  # NodeOutput
        if result.block_execution is not None:
            return ExecutionBlocker(result.block_execution)
        out = {"result": tuple(result.args)}
        ui = _ui_dict(result.ui)
        if ui is not None:
            out["ui"] = ui
        if result.expand is not None:
            if not schema_flags.get("enable_expand"):
                raise ValueError(f"node {cls.__name__} returned 'expand' but its schema does not set "
                                 "enable_expand=True")
            out["expand"] = result.expand
        return out
    raise TypeError(f"node {cls.__name__} returned {type(result).__name__}; expected io.NodeOutput, a tuple, "
                    "a dict or None")


def adapt(cls) -> type:
    """The V1 class the engine runs for a V3 node class (made once per class)."""
    if "V3_CLASS" in cls.__dict__:
        return cls
    existing = cls.__dict__.get("_v1_adapter")
    if existing is not None:
        return existing
    schema = schema_of(cls)
    types, names, is_list, tooltips = _outputs(schema)
    flags = {"enable_expand": bool(getattr(schema, "enable_expand", False))}
    is_async = inspect.iscoroutinefunction(cls.execute)

    def run(self, **kwargs):
        hidden, inputs = _split_hidden(kwargs)
        clone = _clone(cls, hidden)
        return normalize_output(clone.execute(**inputs), cls, flags)

    async def run_async(self, **kwargs):
        hidden, inputs = _split_hidden(kwargs)
        clone = _clone(cls, hidden)
        return normalize_output(await clone.execute(**inputs), cls, flags)

    def input_types(adapter):
        return _inputs(schema_of(cls), "engine")

    def check_lazy_status(self, **kwargs):
        hidden, inputs = _split_hidden(kwargs)
        return _clone(cls, hidden).check_lazy_status(**inputs)

    attributes = {
        "V3_CLASS": cls,
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(types),
        "RETURN_NAMES": tuple(names),
        "OUTPUT_IS_LIST": tuple(is_list),
        "OUTPUT_TOOLTIPS": tuple(tooltips),
        "FUNCTION": "execute_v3",
        "execute_v3": run_async if is_async else run,
        "CATEGORY": schema.category or "sd",
        "DESCRIPTION": schema.description or "",
        "OUTPUT_NODE": bool(schema.is_output_node),
        "INPUT_IS_LIST": bool(schema.is_input_list),
        "NOT_IDEMPOTENT": bool(getattr(schema, "not_idempotent", False)),
        "DEPRECATED": bool(schema.is_deprecated),
        "EXPERIMENTAL": bool(schema.is_experimental),
        "API_NODE": bool(schema.is_api_node),
        "check_lazy_status": check_lazy_status,
    }
    if getattr(cls, "RELATIVE_PYTHON_MODULE", None):
        attributes["RELATIVE_PYTHON_MODULE"] = cls.RELATIVE_PYTHON_MODULE
    if overrides(cls, "validate_inputs"):
        def validate(adapter, **kwargs):
            return _clone(cls, HiddenHolder()).validate_inputs(**kwargs)

        attributes["VALIDATE_INPUTS"] = classmethod(_with_cls_signature(validate, cls.validate_inputs))
    if overrides(cls, "fingerprint_inputs"):
        def fingerprint(adapter, **kwargs):
            return _clone(cls, HiddenHolder()).fingerprint_inputs(**kwargs)

        attributes["IS_CHANGED"] = classmethod(_with_cls_signature(fingerprint, cls.fingerprint_inputs))
    adapter = type(cls.__name__, (), attributes)
    try:
        cls._v1_adapter = adapter
    except (AttributeError, TypeError):
        pass
    return adapter
