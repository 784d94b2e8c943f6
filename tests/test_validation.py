"""POST /prompt validation: every error type and message of docs/comfy-api-contract.md §3.1, over HTTP."""

import pytest


def post(server, body):
    response = server.post("/prompt", body)
    return response.status_code, response.json()


def record(value):
    return {"class_type": "Record", "inputs": {"value": value}}


def errors_of(body, node_id):
    return body["node_errors"][node_id]["errors"]


def test_no_prompt(server):
    status, body = post(server, {"client_id": "x"})
    assert status == 400
    assert body == {"error": {"type": "no_prompt", "message": "No prompt provided",
                              "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}


def test_missing_class_type(server):
    status, body = post(server, {"prompt": {"7": {"inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    assert body["error"]["message"] == "Cannot execute because a node is missing the class_type property."
    assert body["error"]["details"] == "Node ID '#7'" and body["node_errors"] == {}


def test_unknown_node_type(server):
    status, body = post(server, {"prompt": {"3": {"class_type": "Nope", "inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    assert body["error"]["message"] == "Cannot execute because node Nope does not exist."
    assert body["error"]["details"] == "Node ID '#3'"


def test_prompt_without_outputs(server):
    status, body = post(server, {"prompt": {"1": {"class_type": "Number", "inputs": {"value": 1}}}})
    assert status == 400
    assert body["error"] == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                             "extra_info": {}}


def test_required_input_missing(server):
    status, body = post(server, {"prompt": {"1": {"class_type": "Record", "inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    assert body["error"]["details"] == "Required input is missing: value"
    node = body["node_errors"]["1"]
    assert node["class_type"] == "Record" and node["dependent_outputs"] == ["1"]
    assert node["errors"] == [{"type": "required_input_missing", "message": "Required input is missing",
                               "details": "value", "extra_info": {"input_name": "value"}}]


def test_bad_linked_input(server):
    status, body = post(server, {"prompt": {"1": record(["2", 0, 1])}})
    assert status == 400
    (error,) = errors_of(body, "1")
    assert error["type"] == "bad_linked_input"
    assert error["message"] == "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    assert error["extra_info"]["received_value"] == ["2", 0, 1]


def test_return_type_mismatch(server):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1.0}},
              "2": {"class_type": "EvenOnly", "inputs": {"value": ["1", 0]}},
              "3": record(["2", 0])}
    status, body = post(server, {"prompt": prompt})
    assert status == 400
    (error,) = errors_of(body, "2")
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "value, received_type(FLOAT) mismatch input_type(INT)"
    assert error["extra_info"]["linked_node"] == ["1", 0]
    assert body["node_errors"]["2"]["dependent_outputs"] == ["3"]


def test_comma_union_types_match_on_overlap(server):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1.0}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}}, "3": record(["2", 0])}
    status, _ = post(server, {"prompt": prompt})
    assert status == 200


def test_invalid_input_type(server):
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": "many"}}, "2": record(["1", 0])}
    status, body = post(server, {"prompt": prompt})
    (error,) = errors_of(body, "1")
    assert status == 400 and error["type"] == "invalid_input_type"
    assert error["message"] == "Failed to convert an input value to a INT value"
    assert error["details"].startswith("count, many, invalid literal for int()")


def test_coercion_is_written_back(server):
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": "2"}}, "2": record(["1", 1]),
              "3": {"class_type": "Number", "inputs": {"value": 3}}, "4": record(["3", 0])}
    entry = server.run(prompt)
    executed = entry["prompt"][2]
    assert executed["1"]["inputs"]["count"] == 2 and executed["3"]["inputs"]["value"] == 3.0
    assert entry["outputs"]["2"]["values"] == [2]
    assert isinstance(entry["outputs"]["4"]["values"][0], float)


@pytest.mark.parametrize("value,kind,message", [
    (-5000, "value_smaller_than_min", "Value -5000.0 smaller than min of -1000.0"),
    (5000, "value_bigger_than_max", "Value 5000.0 bigger than max of 1000.0"),
])
def test_min_and_max(server, value, kind, message):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": value}}, "2": record(["1", 0])}
    status, body = post(server, {"prompt": prompt})
    (error,) = errors_of(body, "1")
    assert status == 400 and error["type"] == kind and error["message"] == message
    assert error["details"] == "value" and error["extra_info"]["received_value"] == float(value)


def test_value_not_in_list(server):
    base = server.base
    (base / "input").mkdir(exist_ok=True)
    prompt = {"1": {"class_type": "ComboPick", "inputs": {"choice": "purple"}}, "2": record(["1", 0])}
    status, body = post(server, {"prompt": prompt})
    (error,) = errors_of(body, "1")
    assert status == 400 and error["type"] == "value_not_in_list"
    assert error["details"] == "choice: 'purple' not in ['red', 'green', 'blue']"
    assert error["extra_info"]["input_config"] == [["red", "green", "blue"], {"default": "red"}]


def test_value_not_in_long_list(server):
    prompt = {"1": {"class_type": "ComboPick", "inputs": {"choice": "red", "number": "x"}}, "2": record(["1", 0])}
    status, body = post(server, {"prompt": prompt})
    (error,) = errors_of(body, "1")
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "number: 'x' not in (list of length 30)"
    assert error["extra_info"]["input_config"] is None


def test_custom_validation_failed(server):
    prompt = {"1": {"class_type": "EvenOnly", "inputs": {"value": 3}}, "2": record(["1", 0])}
    status, body = post(server, {"prompt": prompt})
    (error,) = errors_of(body, "1")
    assert status == 400 and error["type"] == "custom_validation_failed"
    assert error["message"] == "Custom validation failed for node" and error["details"] == "value - 3 is odd"


def test_validate_inputs_replaces_the_max_check(server):
    prompt = {"1": {"class_type": "EvenOnly", "inputs": {"value": 12}}, "2": record(["1", 0])}
    status, _ = post(server, {"prompt": prompt})
    assert status == 200  # 12 > max 10, but VALIDATE_INPUTS names `value`, so it alone decides


def test_link_to_missing_node_is_an_exception_reason(server):
    status, body = post(server, {"prompt": {"1": record(["99", 0])}})
    assert status == 400
    (error,) = errors_of(body, "1")
    assert error["type"] == "exception_during_validation"
    assert error["message"] == "Exception when validating node"


def test_inner_exception_is_recorded_on_the_linking_node(server):
    prompt = {"1": {"class_type": "Add", "inputs": {"a": ["99", 0], "b": 1}}, "2": record(["1", 0])}
    status, body = post(server, {"prompt": prompt})
    assert status == 400
    (error,) = errors_of(body, "1")
    assert error["type"] == "exception_during_inner_validation"
    assert body["error"]["details"] == ""  # the output's own reasons are empty


def test_cycle_in_submitted_prompt_is_400(server):
    prompt = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}}, "3": record(["2", 0])}
    status, body = post(server, {"prompt": prompt})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"


def test_partially_valid_prompt_runs_valid_outputs_and_reports_the_rest(server):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}}, "2": record(["1", 0]),
              "3": {"class_type": "Record", "inputs": {}}}
    status, body = post(server, {"prompt": prompt})
    assert status == 200 and list(body["node_errors"]) == ["3"]
    entry = server.wait_history(body["prompt_id"])
    assert entry["prompt"][4] == ["2"] and list(entry["outputs"]) == ["2"]


def test_partial_execution_targets(server):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}}, "2": record(["1", 0]), "3": record(["1", 0])}
    status, body = post(server, {"prompt": prompt, "partial_execution_targets": ["3"]})
    assert status == 200
    assert server.wait_history(body["prompt_id"])["prompt"][4] == ["3"]
    status, body = post(server, {"prompt": prompt, "partial_execution_targets": []})
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs"


def test_value_wrapper_is_unwrapped(server):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": {"__value__": 4}}}, "2": record(["1", 0])}
    entry = server.run(prompt)
    assert entry["outputs"]["2"]["values"] == [4.0]


def test_int_and_float_literals_keep_their_kind(server):
    prompt = {"1": record(5), "2": record(5.0)}
    entry = server.run(prompt)
    assert entry["outputs"]["1"]["values"] == [5] and entry["outputs"]["2"]["values"] == [5.0]
    assert server.get(f"/history/{entry['prompt'][1]}").text.count('"values": [5.0]') == 1
