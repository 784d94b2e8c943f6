"""Hostile JSON bodies to POST /prompt, /history, /queue, /free and /interrupt (and their /api aliases):
generated JSON values, prompt-shaped objects with every JSON type in every field, broken links, cycles,
huge and non-finite numbers (sent as raw `NaN`/`Infinity`/`1e999` text, which Python's json accepts), deep
nesting, odd ids and priorities; about one request in six is a valid prompt of the test pack, so execution
runs all along; a few bodies are not JSON at all. Each answer must be a well-formed response and never a
500 (not even for an unparsable body, unlike ComfyUI), and the server must be whole afterwards."""

from __future__ import annotations

import json

import pytest
from hypothesis import strategies as st

from . import support

EXAMPLES = 4200  # each example sends 1-3 requests
TIME_LIMIT_S = 70

# Nodes of tests/packs/engine_test_nodes.py whose inputs cannot make them run for long (no Sleep/SlowSteps:
# a generated `seconds: 60` would only slow the suite down, not find anything).
NODES = ["Number", "Add", "Record", "RecordList", "MakeList", "LazySwitch", "Fail", "Block", "SumTo", "SelfLoop",
         "Counter", "EvenOnly", "ComboPick", "PreviewSteps", "Stateful", "ClashingExpand"]
INPUT_NAMES = ["value", "a", "b", "label", "n", "count", "use_a", "choice", "number", "stable", "tag", "message",
               "block", "steps", "", "__proto__", "value "]
NODE_IDS = ["1", "2", "3", "4", "0", "-1", "", "1.0", " 1", "a" * 300, "\u00e9\u4e2d\U0001f4a5", "__proto__", "\x00"]
REUSED_PROMPT_IDS = ["fuzz-reused-1", "fuzz-reused-2", "", "0", "null", "a/b", "../x", "\x00", "\u4e2d" * 50]
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E+308", "4.9e-324", "-0.0", "0", "1" * 4000,
               "1" * 5000, "0." + "0" * 1000 + "1", "18446744073709551615", "-9223372036854775809", "1e-999",
               "123456789012345678901234567890.5", "1" + "0" * 309, "-" + "9" * 400]  # ints beyond float range
ROUTES = ["/prompt"] * 6 + ["/history", "/queue", "/free", "/interrupt"]
CONTENT_TYPES = [None, "application/json", "application/x-www-form-urlencoded", "text/plain",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1", "\u00ff"]


class Raw:
    """JSON text placed as is inside a generated structure."""

    def __init__(self, text: str):
        self.text = text


def dumps(value) -> str:
    """json.dumps (NaN/Infinity written as raw text, as Python does) plus Raw fragments."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(json.dumps(str(k)) + ": " + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(RAW_NUMBERS).map(Raw))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=12)
node_ids = st.one_of(st.sampled_from(NODE_IDS), st.text(max_size=6))


def deep(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    if kind == "dict":
        return Raw('{"a": ' * depth + "1" + "}" * depth)
    return Raw('[{"a": ' * (depth // 2) + "null" + "}]" * (depth // 2))


depths = st.one_of(st.integers(2, 99), st.sampled_from([100, 101, 500, 999, 1000, 1001, 3000, 5000]))
deep_values = st.builds(deep, depths, st.sampled_from(["list", "dict", "mixed"]))
links = st.one_of(
    st.sampled_from([["1"], ["1", "x"], [1, 0], ["1", 0, 0], ["missing", 0], ["1", -1], ["1", 99], ["1", 0.5],
                     ["1", True], [None, 0], [["1", 0], 0], [{"1": 0}, 0], ["1", None], ["1", "0"], [],
                     ["1", 10 ** 30], ["", 0]]),
    st.tuples(node_ids, st.integers(-3, 5)).map(list),
    st.tuples(json_values, json_values).map(list),
)
input_values = st.one_of(scalars, links, json_values, deep_values,
                         st.builds(lambda v: {"__value__": v}, json_values))
inputs = st.one_of(st.dictionaries(st.one_of(st.sampled_from(INPUT_NAMES), st.text(max_size=5)), input_values,
                                   max_size=4), json_values)
class_types = st.one_of(st.sampled_from(NODES + ["", "Nope", "number", "Number ", "Record\x00"]), json_values)
nodes = st.one_of(
    st.fixed_dictionaries({"class_type": class_types, "inputs": inputs},
                          optional={"_meta": json_values, "is_changed": json_values}),
    st.fixed_dictionaries({"class_type": st.sampled_from(NODES)}),
    st.fixed_dictionaries({"inputs": inputs}),
    json_values,
)


@st.composite
def targeted_prompts(draw):
    """Shapes that reach the graph code: cycles, self links, links to missing nodes or outputs, wrong types."""
    v = draw(st.one_of(st.floats(-1000, 1000), st.sampled_from(RAW_NUMBERS).map(Raw)))
    shape = draw(st.sampled_from(["cycle", "self", "missing", "bad_output", "long_chain", "wide", "expand_cycle",
                                  "wrong_type", "lazy_cycle"]))
    if shape == "cycle":
        return {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": v}},
                "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": v}},
                "3": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    if shape == "self":
        return {"1": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": v}},
                "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    if shape == "missing":
        return {"2": {"class_type": "Record", "inputs": {"value": [draw(node_ids), 0]}}}
    if shape == "bad_output":
        return {"1": {"class_type": "Number", "inputs": {"value": v}},
                "2": {"class_type": "Record", "inputs": {"value": ["1", draw(st.integers(-5, 5))]}}}
    if shape == "long_chain":
        n = draw(st.integers(2, 300))
        prompt = {"0": {"class_type": "Number", "inputs": {"value": 1.0}}}
        for i in range(1, n):
            prompt[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": 1.0}}
        prompt["out"] = {"class_type": "Record", "inputs": {"value": [str(n - 1), 0]}}
        return prompt
    if shape == "wide":
        n = draw(st.integers(2, 200))
        return {str(i): {"class_type": "Record", "inputs": {"value": v}} for i in range(n)}
    if shape == "expand_cycle":
        return {"1": {"class_type": "SelfLoop", "inputs": {"value": v}},
                "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    if shape == "wrong_type":
        return {"1": {"class_type": "ComboPick", "inputs": {"choice": draw(json_values)}},
                "2": {"class_type": "Number", "inputs": {"value": ["1", 0]}},
                "3": {"class_type": "Record", "inputs": {"value": ["2", 0]}}}
    return {"1": {"class_type": "LazySwitch", "inputs": {"use_a": draw(json_values), "a": ["1", 0], "b": ["2", 0]}},
            "2": {"class_type": "Number", "inputs": {"value": v}},
            "3": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}


@st.composite
def valid_prompts(draw):
    """Prompts the test pack runs quickly and successfully (or fails in the node, for Fail)."""
    value = draw(st.floats(-1000, 1000, allow_nan=False))
    kind = draw(st.sampled_from(["record", "add", "sum", "list", "slow", "lazy", "fail", "combo", "even",
                                 "counter", "preview"]))
    rec = {"class_type": "Record", "inputs": {"value": ["1", 0], "label": draw(st.text(max_size=10))}}
    if kind == "record":
        return {"1": {"class_type": "Number", "inputs": {"value": value}}, "2": rec}
    if kind == "add":
        return {"n": {"class_type": "Number", "inputs": {"value": value}},
                "1": {"class_type": "Add", "inputs": {"a": ["n", 0], "b": draw(st.integers(-5, 5))}}, "2": rec}
    if kind == "sum":
        return {"1": {"class_type": "SumTo", "inputs": {"n": draw(st.integers(1, 8))}}, "2": rec}
    if kind == "list":
        return {"1": {"class_type": "MakeList", "inputs": {"count": draw(st.integers(0, 6))}},
                "2": {"class_type": "RecordList", "inputs": {"value": ["1", 0]}}}
    if kind == "slow":
        return {"n": {"class_type": "Number", "inputs": {"value": value}},
                "1": {"class_type": "SlowSteps", "inputs": {"value": ["n", 0], "steps": draw(st.integers(1, 3)),
                                                            "step_seconds": 0.002}}, "2": rec}
    if kind == "lazy":
        return {"a": {"class_type": "Number", "inputs": {"value": value}},
                "b": {"class_type": "Number", "inputs": {"value": 1.0}},
                "1": {"class_type": "LazySwitch", "inputs": {"use_a": draw(st.booleans()), "a": ["a", 0],
                                                             "b": ["b", 0]}}, "2": rec}
    if kind == "fail":
        return {"n": {"class_type": "Number", "inputs": {"value": value}},
                "1": {"class_type": "Fail", "inputs": {"value": ["n", 0], "message": draw(st.text(max_size=20))}},
                "2": rec}
    if kind == "combo":
        return {"1": {"class_type": "ComboPick", "inputs": {"choice": draw(st.sampled_from(["red", "green"]))}},
                "2": rec}
    if kind == "even":
        return {"1": {"class_type": "EvenOnly", "inputs": {"value": draw(st.integers(0, 10))}}, "2": rec}
    if kind == "counter":
        return {"1": {"class_type": "Counter", "inputs": {"stable": draw(st.booleans())}}, "2": rec}
    return {"1": {"class_type": "PreviewSteps", "inputs": {"value": value, "steps": 1}}, "2": rec}


prompts = st.one_of(st.dictionaries(node_ids, nodes, max_size=5), targeted_prompts(), json_values, deep_values)
numbers = st.one_of(json_values, st.sampled_from(RAW_NUMBERS).map(Raw), st.floats(), st.integers())
prompt_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(prompts, valid_prompts())},
    optional={"client_id": st.one_of(json_values, st.sampled_from(["", "x" * 10000, "\x00", "same-client"])),
              "extra_data": st.one_of(json_values, deep_values,
                                      st.builds(lambda d: {"extra_pnginfo": {"workflow": d}}, deep_values)),
              "prompt_id": st.one_of(json_values, st.sampled_from(REUSED_PROMPT_IDS)),
              "number": numbers, "front": json_values,
              "partial_execution_targets": st.one_of(json_values, st.lists(node_ids, max_size=4))})
valid_bodies = st.fixed_dictionaries(
    {"prompt": valid_prompts()},
    optional={"client_id": st.sampled_from(["fuzz-client", "same-client"]),
              "prompt_id": st.sampled_from(REUSED_PROMPT_IDS[:2]),
              "number": st.one_of(st.integers(-10, 10), st.floats(-1e6, 1e6, allow_nan=False)),
              "front": st.booleans(), "partial_execution_targets": st.just(["2"]),
              "extra_data": st.just({"extra_pnginfo": {"workflow": {"nodes": []}}})})
control_bodies = st.one_of(
    json_values, deep_values,
    st.fixed_dictionaries({}, optional={"clear": json_values, "delete": st.one_of(
        json_values, st.lists(st.one_of(st.sampled_from(REUSED_PROMPT_IDS), json_values), max_size=4)),
        "prompt_id": json_values, "unload_models": json_values, "free_memory": json_values}),
)
unparsable = st.sampled_from([b"", b"{", b'{"prompt": ', b"\xff\xfe{}", b'{"a": 1,}', b"{'a': 1}", b"nan",
                              b'{"prompt": {}}\x00', b"\xef\xbb\xbf{}", b'"\\ud800"', b"[1, 2"])


@st.composite
def one_request(draw):
    route = draw(st.sampled_from(ROUTES))
    if route == "/prompt":
        body = draw(st.one_of(valid_bodies, prompt_bodies, prompt_bodies, json_values, deep_values))
    else:
        body = draw(control_bodies)
    text = dumps(body).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 39)) == 0:
        text = draw(unparsable)
    if draw(st.integers(0, 4)) == 0:
        route = "/api" + route
    return route, text, draw(st.sampled_from(CONTENT_TYPES))


@pytest.mark.slow
def test_hostile_json_never_breaks_the_server(fuzz_server):
    tally = support.new_tally("hostile-json", fuzz_server)
    client = support.KeepAlive(fuzz_server.port)

    def handle(batch) -> None:
        for route, body, content_type in batch:
            headers = [("Content-Type", content_type)] if content_type else []
            tally.sent += 1
            result = client.request("POST", route, body, headers)
            tally.keepalive_result(result, f"POST {route} {support.show(body)}")

    support.fuzz(tally, st.lists(one_request(), min_size=1, max_size=3), handle, examples=EXAMPLES,
                 time_limit_s=TIME_LIMIT_S)
    tally.connections = client.connections
    client.close()
    problems = tally.finish()
    assert not problems, "\n".join(problems)
