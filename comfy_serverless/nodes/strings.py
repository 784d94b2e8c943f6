"""ComfyUI's utils/string nodes and PreviewAny.

Like ComfyUI, RegexMatch and RegexExtract answer False / "" for a pattern that does not compile (the error is
logged); RegexReplace reports it as the node's error. Standard library only (see nodes/__init__.py).
"""

from __future__ import annotations

import json
import logging
import re

log = logging.getLogger(__name__)

CASE_MODES = ["UPPERCASE", "lowercase", "Capitalize", "Title Case"]
TRIM_MODES = ["Both", "Left", "Right"]
COMPARE_MODES = ["Starts With", "Ends With", "Equal"]
EXTRACT_MODES = ["First Match", "All Matches", "First Group", "All Groups"]


def _text(**extra):
    return ("STRING", {"multiline": True, **extra})


def _combo(options):
    return ("COMBO", {"multiselect": False, "options": list(options)})


def _check(node: str, name: str, value: str, options: list[str]) -> None:
    if value not in options:
        raise ValueError(f"{node}: unknown {name} {value!r}; one of {options}")


def _flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    return ((re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0)
            | (re.DOTALL if dotall else 0))


def _compile(node: str, pattern: str, flags: int):
    """The compiled pattern, or None (logged) when it is not a valid regular expression."""
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        log.warning("%s: invalid regular expression %r: %s", node, pattern, exc)
        return None


class _StringNode:
    RETURN_TYPES: tuple = ("STRING",)
    FUNCTION = "execute"
    CATEGORY = "utils/string"


class StringConcatenate(_StringNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string_a": _text(), "string_b": _text(),
                             "delimiter": ("STRING", {"default": "", "multiline": False})}}

    def execute(self, string_a, string_b, delimiter):
        return (f"{string_a}{delimiter}{string_b}",)


class StringSubstring(_StringNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "start": ("INT", {}), "end": ("INT", {})}}

    def execute(self, string, start, end):
        return (string[start:end],)  # Python slicing: negative positions count from the end


class StringLength(_StringNode):
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("length",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text()}}

    def execute(self, string):
        return (len(string),)


class CaseConverter(_StringNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "mode": _combo(CASE_MODES)}}

    def execute(self, string, mode):
        _check("CaseConverter", "mode", mode, CASE_MODES)
        convert = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize,
                   "Title Case": str.title}[mode]
        return (convert(string),)


class StringTrim(_StringNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "mode": _combo(TRIM_MODES)}}

    def execute(self, string, mode):
        _check("StringTrim", "mode", mode, TRIM_MODES)
        return ({"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}[mode](string),)


class StringReplace(_StringNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "find": _text(), "replace": _text()}}

    def execute(self, string, find, replace):
        return (string.replace(find, replace),)


class StringContains(_StringNode):
    RETURN_TYPES = ("BOOLEAN",)
    RETURN_NAMES = ("contains",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "substring": _text(),
                             "case_sensitive": ("BOOLEAN", {"default": True})}}

    def execute(self, string, substring, case_sensitive):
        if not case_sensitive:
            string, substring = string.lower(), substring.lower()
        return (substring in string,)


class StringCompare(_StringNode):
    RETURN_TYPES = ("BOOLEAN",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string_a": _text(), "string_b": _text(), "mode": _combo(COMPARE_MODES),
                             "case_sensitive": ("BOOLEAN", {"default": True})}}

    def execute(self, string_a, string_b, mode, case_sensitive):
        _check("StringCompare", "mode", mode, COMPARE_MODES)
        if not case_sensitive:
            string_a, string_b = string_a.lower(), string_b.lower()
        if mode == "Starts With":
            return (string_a.startswith(string_b),)
        if mode == "Ends With":
            return (string_a.endswith(string_b),)
        return (string_a == string_b,)


def _regex_options():
    return {"case_insensitive": ("BOOLEAN", {"default": True}), "multiline": ("BOOLEAN", {"default": False}),
            "dotall": ("BOOLEAN", {"default": False})}


class RegexMatch(_StringNode):
    RETURN_TYPES = ("BOOLEAN",)
    RETURN_NAMES = ("matches",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "regex_pattern": _text(), **_regex_options()}}

    def execute(self, string, regex_pattern, case_insensitive, multiline, dotall):
        pattern = _compile("RegexMatch", regex_pattern, _flags(case_insensitive, multiline, dotall))
        return (pattern is not None and pattern.search(string) is not None,)


class RegexExtract(_StringNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"string": _text(), "regex_pattern": _text(), "mode": _combo(EXTRACT_MODES),
                             **_regex_options(),
                             "group_index": ("INT", {"default": 1, "min": 0, "max": 100})}}

    def execute(self, string, regex_pattern, mode, case_insensitive, multiline, dotall, group_index):
        _check("RegexExtract", "mode", mode, EXTRACT_MODES)
        pattern = _compile("RegexExtract", regex_pattern, _flags(case_insensitive, multiline, dotall))
        if pattern is None:
            return ("",)
        if mode == "First Match":
            found = pattern.search(string)
            return (found.group(0) if found else "",)
        if mode == "All Matches":
            # With groups in the pattern, each match contributes its first group (re.findall's first element).
            return ("\n".join(m.group(1 if pattern.groups else 0) or "" for m in pattern.finditer(string)),)
        if pattern.groups < group_index:
            return ("",)
        if mode == "First Group":
            found = pattern.search(string)
            matches = [found] if found is not None else []
        else:
            matches = [m for m in pattern.finditer(string) if m.groups()]
        return ("\n".join(m.group(group_index) or "" for m in matches),)


class RegexReplace(_StringNode):
    DESCRIPTION = "Find and replace text using regex patterns."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"string": _text(), "regex_pattern": _text(), "replace": _text()},
            "optional": {
                **_regex_options(),
                "count": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Maximum number of replacements "
                                  "to make; 0 replaces every occurrence."}),
            },
        }

    def execute(self, string, regex_pattern, replace, case_insensitive=True, multiline=False, dotall=False,
                count=0):
        try:
            pattern = re.compile(regex_pattern, _flags(case_insensitive, multiline, dotall))
            return (pattern.sub(replace, string, count=count),)
        except re.error as exc:
            raise ValueError(f"RegexReplace: {exc} (pattern {regex_pattern!r}, replacement {replace!r})") from None


class PreviewAny:
    """Shows any value as text in the ui: strings as they are, numbers and booleans with str(), anything else
    as JSON when it can be, else its str()."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True
    CATEGORY = "utils"

    def main(self, source=None):
        if source is None:
            text = "None"
        elif isinstance(source, str):
            text = source
        elif isinstance(source, (bool, int, float)):
            text = str(source)
        else:
            try:
                text = json.dumps(source)
            except Exception:  # not JSON-able (tensors, objects, cycles)
                try:
                    text = str(source)
                except Exception:
                    text = "source exists, but could not be serialized."
        return {"ui": {"text": [text]}}  # a list: the engine extends lists, as ComfyUI extends any sequence


NODE_CLASS_MAPPINGS = {
    "StringConcatenate": StringConcatenate,
    "StringSubstring": StringSubstring,
    "StringLength": StringLength,
    "CaseConverter": CaseConverter,
    "StringTrim": StringTrim,
    "StringReplace": StringReplace,
    "StringContains": StringContains,
    "StringCompare": StringCompare,
    "RegexMatch": RegexMatch,
    "RegexExtract": RegexExtract,
    "RegexReplace": RegexReplace,
    "PreviewAny": PreviewAny,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "StringConcatenate": "Concatenate",
    "StringSubstring": "Substring",
    "StringLength": "Length",
    "CaseConverter": "Case Converter",
    "StringTrim": "Trim",
    "StringReplace": "Replace",
    "StringContains": "Contains",
    "StringCompare": "Compare",
    "RegexMatch": "Regex Match",
    "RegexExtract": "Regex Extract",
    "RegexReplace": "Regex Replace",
    "PreviewAny": "Preview Any",
}
