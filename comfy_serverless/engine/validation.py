"""Prompt validation with ComfyUI's error types and messages (docs/comfy-api-contract.md §3.1).

Works from the catalogue snapshot: only nodes that define VALIDATE_INPUTS need their class, loaded through
`load_class` (the caller runs validation off the event loop when that may import a pack).
"""

from __future__ import annotations

import asyncio
import inspect
import traceback

from .executor import type_name
from .graph import ExecutionBlocker

COERCE = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


class ValidationResult:
    def __init__(self, ok: bool, error: dict | None, outputs: list, node_errors: dict):
        self.ok = ok
        self.error = error
        self.outputs = outputs
        self.node_errors = node_errors


def reason(kind: str, message: str, details: str = "", **extra_info) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


WILDCARD_TYPES = ("*", "COMFY_MATCHTYPE_V3")  # V3 match types are checked by the frontend, not the server


def types_match(received, expected) -> bool:
    """Equal types, `*` on either side, or comma unions that overlap. A V3 "COMBO" input also takes a V1 combo
    list (nodes that output their list of options as a type)."""
    if received == expected:
        return True
    if received in WILDCARD_TYPES or expected in WILDCARD_TYPES:
        return True
    if isinstance(received, list) and expected == "COMBO":
        return True
    if isinstance(received, str) and isinstance(expected, str):
        got = {t.strip() for t in received.split(",")}
        want = {t.strip() for t in expected.split(",")}
        return bool(got & want) or "*" in got or "*" in want
    return False


def runs_node_code(prompt, catalog) -> bool:
    """True when validating calls some node's VALIDATE_INPUTS (may import a pack or run a coroutine):
    the server then validates off its event loop."""
    if not isinstance(prompt, dict):
        return False
    for node in prompt.values():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        spec = catalog.spec(class_type) if isinstance(class_type, str) else None
        if spec is not None and spec.facts.get("validate_inputs"):
            return True
    return False


def _fail(kind: str, message: str, details: str) -> ValidationResult:
    return ValidationResult(False, {"type": kind, "message": message, "details": details, "extra_info": {}}, [], {})


def validate_prompt(prompt, catalog, folders, partial_targets=None) -> ValidationResult:
    if not isinstance(prompt, dict):
        return _fail("invalid_prompt", "Cannot execute because the prompt is not a JSON object.", "")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _fail("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                         f"Node ID '#{node_id}'")
        if not isinstance(node["class_type"], str):  # a list or dict would not even be hashable
            return _fail("invalid_prompt", f"Cannot execute because node #{node_id} has a class_type that is "
                         f"not a string ({type(node['class_type']).__name__}).", f"Node ID '#{node_id}'")
        if node["class_type"] not in catalog:
            return _fail("invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                         f"Node ID '#{node_id}'")
        if not isinstance(node.get("inputs", {}), dict):
            return _fail("invalid_prompt", "Cannot execute because a node's inputs are not a JSON object.",
                         f"Node ID '#{node_id}'")
    failure = _check_partial_targets(prompt, partial_targets)
    if failure is not None:
        return failure

    outputs = [node_id for node_id, node in prompt.items()
               if catalog.spec(node["class_type"]).output_node
               and (partial_targets is None or node_id in partial_targets)]
    if not outputs:
        return _fail("prompt_no_outputs", "Prompt has no outputs", "")

    checker = _Checker(prompt, catalog, folders)
    good, failed, node_errors = [], [], {}
    for output_id in outputs:
        try:
            ok, reasons = checker.check(output_id)
        except Exception as exc:
            ok, reasons = False, [reason("exception_during_validation", "Exception when validating node",
                                         str(exc), exception_type=type_name(type(exc)),
                                         traceback=traceback.format_tb(exc.__traceback__))]
            checker.results[output_id] = (False, reasons)
        if ok:
            good.append(output_id)
            continue
        failed.append((output_id, reasons))
        for node_id, (node_ok, node_reasons) in checker.results.items():
            if node_ok or not node_reasons:
                continue
            entry = node_errors.setdefault(node_id, {"errors": node_reasons, "dependent_outputs": [],
                                                     "class_type": prompt[node_id]["class_type"]})
            entry["dependent_outputs"].append(output_id)
    if not good:
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        return ValidationResult(False, {"type": "prompt_outputs_failed_validation",
                                        "message": "Prompt outputs failed validation", "details": details,
                                        "extra_info": {}}, [], node_errors)
    return ValidationResult(True, None, good, node_errors)


def _check_partial_targets(prompt: dict, targets) -> ValidationResult | None:
    """None (run every output) or a list of node ids of this prompt; a string would match by substring."""
    if targets is None:
        return None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return _fail("invalid_prompt", "partial_execution_targets must be a list of node id strings.",
                     f"got {type(targets).__name__}" if not isinstance(targets, list) else "a list with non-strings")
    unknown = [t for t in targets if t not in prompt]
    if unknown:
        shown = ", ".join(f"'#{t}'" for t in unknown[:10])
        return _fail("invalid_prompt", "partial_execution_targets names nodes that are not in the prompt.",
                     f"Node ID {shown}")
    return None


class _Checker:
    def __init__(self, prompt: dict, catalog, folders):
        self.prompt = prompt
        self.catalog = catalog
        self.folders = folders
        self.results: dict[str, tuple[bool, list]] = {}
        self._active: set[str] = set()

    def check(self, node_id: str) -> tuple[bool, list]:
        if node_id in self.results:
            return self.results[node_id]
        if node_id in self._active:
            raise RecursionError(f"Dependency cycle through node {node_id}")
        self._active.add(node_id)
        try:
            result = self._check(node_id)
        finally:
            self._active.discard(node_id)
        self.results[node_id] = result
        return result

    def _check(self, node_id: str) -> tuple[bool, list]:
        node = self.prompt[node_id]
        spec = self.catalog.spec(node["class_type"])
        inputs = node.setdefault("inputs", {})
        declared = spec.input_types(self.folders)
        validator = spec.facts.get("validate_inputs")
        validated_by_node = set(validator["params"]) if validator else set()
        takes_all = bool(validator and validator["var_keyword"])
        wants_types = "input_types" in validated_by_node
        errors, valid, received_types = [], True, {}

        for category in ("required", "optional"):
            for name, config in (declared.get(category) or {}).items():
                if name not in inputs:
                    if category == "required":
                        errors.append(reason("required_input_missing", "Required input is missing", name,
                                             input_name=name))
                    continue
                value = inputs[name]
                expected = config[0] if isinstance(config, list) and config else config
                options = config[1] if isinstance(config, list) and len(config) > 1 else {}
                options = options if isinstance(options, dict) else {}
                if isinstance(value, list):
                    ok = self._check_link(node_id, name, value, config, expected, wants_types, received_types,
                                          errors)
                    valid = valid and ok
                    continue
                # a backend node's combos are the backend's files as last read: the backend checks them itself
                custom = name in validated_by_node or takes_all or (spec.on_backend and isinstance(expected, list))
                self._check_literal(inputs, name, value, config, expected, options, custom, errors)

        if validator:
            errors += self._custom_validation(node_id, spec, inputs, declared, validator, received_types)
        ok = valid and not errors
        return (True, []) if ok else (False, errors)

    def _check_link(self, node_id, name, value, config, expected, wants_types, received_types, errors) -> bool:
        if len(value) != 2:
            errors.append(reason("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                 "[node_id, slot_index]", name, input_name=name, input_config=config,
                                 received_value=value))
            return True
        if isinstance(value[0], int) and not isinstance(value[0], bool):
            value[0] = str(value[0])  # some clients send numeric ids; ComfyUI's keys are strings
        source_id, slot = value
        source = self.prompt[source_id]  # KeyError -> exception reason for this node (docs/comfy-api-contract.md §3.1)
        source_spec = self.catalog.spec(source["class_type"])
        return_types = source_spec.return_types
        extra_type = source_spec.facts.get("extra_output_type")
        # A pack's RETURN_TYPES may answer any slot (variable outputs); ComfyUI indexes the live tuple the same way.
        received = extra_type if extra_type is not None and slot >= len(return_types) else return_types[slot]
        if isinstance(received, dict):  # a disk-backed combo output
            from ..catalog.catalog import fill_file_lists

            received = fill_file_lists(received, self.folders)
        received_types[name] = received
        if not wants_types and not types_match(received, expected):
            errors.append(reason("return_type_mismatch", "Return type mismatch between linked nodes",
                                 f"{name}, received_type({received}) mismatch input_type({expected})",
                                 input_name=name, input_config=config, received_type=received,
                                 linked_node=value))
            return True
        try:
            ok, _ = self.check(source_id)
        except Exception as exc:
            self.results[source_id] = (False, [reason(
                "exception_during_inner_validation", "Exception when validating inner node", str(exc),
                input_name=name, input_config=config, exception_message=str(exc),
                exception_type=type_name(type(exc)), traceback=traceback.format_tb(exc.__traceback__),
                linked_node=value)])
            return False
        return ok

    def _check_literal(self, inputs, name, value, config, expected, options, custom, errors) -> None:
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
            inputs[name] = value
        coerce = COERCE.get(expected) if isinstance(expected, str) else None
        if coerce is not None:
            try:
                value = coerce(value)
                inputs[name] = value
            except Exception as exc:
                errors.append(reason("invalid_input_type", f"Failed to convert an input value to a {expected} value",
                                     f"{name}, {value}, {exc}", input_name=name, input_config=config,
                                     received_value=value, exception_message=str(exc)))
                return
        if custom:
            return
        if "min" in options and value < options["min"]:
            errors.append(reason("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}",
                                 name, input_name=name, input_config=config, received_value=value))
        elif "max" in options and value > options["max"]:
            errors.append(reason("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}",
                                 name, input_name=name, input_config=config, received_value=value))
        elif isinstance(expected, list) and value not in expected:
            if len(expected) > 20:
                details, shown = f"{name}: '{value}' not in (list of length {len(expected)})", None
            else:
                details, shown = f"{name}: '{value}' not in {expected}", config
            errors.append(reason("value_not_in_list", "Value not in list", details, input_name=name,
                                 input_config=shown, received_value=value))

    def _custom_validation(self, node_id, spec, inputs, declared, validator, received_types) -> list:
        cls = self.catalog.load_class(spec.name)
        data = {}
        for name, value in inputs.items():
            known = any(name in (declared.get(c) or {}) for c in ("required", "optional", "hidden"))
            if isinstance(value, list):
                data[name] = [None]
            elif known:
                data[name] = [value]
        for name, kind in (declared.get("hidden") or {}).items():
            if kind == "PROMPT":
                data[name] = [self.prompt]
            elif kind == "UNIQUE_ID":
                data[name] = [node_id]
            elif kind in ("EXTRA_PNGINFO", "DYNPROMPT"):
                data[name] = [None]
        chosen = {k: v for k, v in data.items() if validator["var_keyword"] or k in validator["params"]}
        if "input_types" in validator["params"]:
            chosen["input_types"] = [received_types]
        from .executor import _calls

        results = []
        for _, kwargs in _calls(chosen, bool(spec.facts.get("input_is_list"))):
            result = cls.VALIDATE_INPUTS(**kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(result)
            results.append(result)
        errors = []
        for name in chosen:
            for result in results:
                if result is True or isinstance(result, ExecutionBlocker):
                    continue
                details = name if result is False else f"{name} - {result}"
                errors.append(reason("custom_validation_failed", "Custom validation failed for node", details,
                                     input_name=name))
        return errors
