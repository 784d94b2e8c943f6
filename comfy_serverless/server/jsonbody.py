"""JSON request bodies with a nesting limit, so no body can overflow a recursive copy or walk later on.

The C decoder itself survives deep nesting only to about a thousand levels, and every recursive consumer
after it (deepcopy, validation, logging) has less headroom, so the depth is checked on the raw text first.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate

# A JSON string, escapes included (the unrolled form keeps the regex engine linear).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class BadJSON(ValueError):
    """The body is not acceptable JSON; the message says why, for the client."""


def max_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in a JSON text (brackets inside strings don't count)."""
    outside_strings = _STRING.sub("", text)
    steps = map(_STEP.__getitem__, _BRACKETS.findall(outside_strings))
    return max(accumulate(steps), default=0)


def _reject_constant(name: str):
    raise BadJSON(f"{name} is not valid JSON (numbers must be finite)")


def loads(data: bytes, depth_limit: int):
    """Parses a request body; raises BadJSON for invalid UTF-8, invalid JSON, NaN/Infinity or deep nesting."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadJSON(f"the body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    # Counting is C-speed; only a body with more brackets than the limit can be too deep.
    if depth_limit > 0 and text.count("[") + text.count("{") > depth_limit:
        depth = max_depth(text)
        if depth > depth_limit:
            raise BadJSON(f"JSON nested {depth} levels deep; the limit is {depth_limit} (--max-json-depth)")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except BadJSON:
        raise
    except (ValueError, RecursionError) as exc:
        raise BadJSON(f"invalid JSON: {exc}") from None
