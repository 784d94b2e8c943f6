"""POST /prompt and the queue/history routes refuse bad input with a 400 in ComfyUI's error shape, never a 500."""

import json
import time

import pytest

from conftest import number, record, simple_prompt


def assert_400(response, kind=None):
    assert response.status_code == 400, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "node_errors"} and body["node_errors"] == {}
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["details"], str)
    if kind is not None:
        assert body["error"]["type"] == kind, body
    return body["error"]


def post_raw(srv, path, text):
    return srv.post(path, data=text.encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("class_type", [["Number"], {"name": "Number"}, 5, None])
def test_class_type_must_be_a_string(server, class_type):
    prompt = {"1": {"class_type": class_type, "inputs": {"value": 1}}, "2": record(["1", 0])}
    error = assert_400(server.post("/prompt", {"prompt": prompt}), "invalid_prompt")
    assert error["details"] == "Node ID '#1'"


@pytest.mark.parametrize("targets", [5, "2", [{}], [2], {"2": True}, ["2", "99"]])
def test_partial_execution_targets_must_list_existing_node_ids(server, targets):
    body = {"prompt": simple_prompt(), "partial_execution_targets": targets}
    assert_400(server.post("/prompt", body), "invalid_prompt")


def test_valid_partial_execution_targets_still_work(server):
    queued = server.queue_prompt(simple_prompt(7), partial_execution_targets=["2"])
    assert server.wait_history(queued["prompt_id"])["status"]["status_str"] == "success"


@pytest.mark.parametrize("raw", ["1e999", "-1e999", "NaN", "Infinity", "1" + "0" * 400, '"5"', "true", "[1]",
                                 "{}", "null"])
def test_number_must_be_a_finite_number(server, raw):
    text = '{"prompt": %s, "number": %s}' % (json.dumps(simple_prompt()), raw)
    error = assert_400(post_raw(server, "/prompt", text))
    assert error["type"] in ("invalid_prompt", "invalid_json")  # NaN may already fail JSON parsing


def test_queue_keeps_its_order_after_refused_numbers(server):
    post_raw(server, "/prompt", '{"prompt": %s, "number": NaN}' % json.dumps(simple_prompt()))
    queued = server.queue_prompt(simple_prompt(3), number=2.5)
    assert queued["number"] == 2.5
    assert server.wait_history(queued["prompt_id"])["status"]["status_str"] == "success"


@pytest.mark.parametrize("prompt_id", [5, "", "x" * 257, [], {}, True])
def test_prompt_id_must_be_a_short_non_empty_string(server, prompt_id):
    assert_400(server.post("/prompt", {"prompt": simple_prompt(), "prompt_id": prompt_id}), "invalid_prompt")


def test_prompt_id_of_256_characters_is_accepted(server):
    prompt_id = "p" * 255 + str(time.monotonic_ns() % 10)
    server.post("/history", {"delete": [prompt_id]})
    queued = server.queue_prompt(simple_prompt(4), prompt_id=prompt_id)
    assert queued["prompt_id"] == prompt_id
    server.wait_history(prompt_id)


def test_duplicate_prompt_id_is_refused_while_running_pending_and_in_history(server, tmp_path):
    release = tmp_path / "release"
    running_id, pending_id = f"dup-running-{tmp_path.name}", f"dup-pending-{tmp_path.name}"
    holder = {"1": number(11), "2": {"class_type": "WaitForFile", "inputs": {
        "value": ["1", 0], "path": str(release), "timeout": 60.0}}, "3": record(["2", 0])}
    server.queue_prompt(holder, prompt_id=running_id)
    deadline = time.monotonic() + 30
    while running_id not in [item[1] for item in server.get("/queue").json()["queue_running"]]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.02)
    server.queue_prompt(simple_prompt(12), prompt_id=pending_id)
    try:
        assert_400(server.post("/prompt", {"prompt": simple_prompt(13), "prompt_id": running_id}),
                   "duplicate_prompt_id")
        assert_400(server.post("/prompt", {"prompt": simple_prompt(14), "prompt_id": pending_id}),
                   "duplicate_prompt_id")
    finally:
        release.touch()
    server.wait_history(pending_id)
    assert_400(server.post("/prompt", {"prompt": simple_prompt(15), "prompt_id": running_id}),
               "duplicate_prompt_id")
    entry = server.get(f"/history/{running_id}").json()[running_id]
    assert entry["prompt"][2]["1"]["inputs"]["value"] == 11  # the first prompt's entry, not overwritten
    queue = server.get("/queue").json()
    assert [item[1] for item in queue["queue_pending"] + queue["queue_running"]].count(pending_id) == 0


@pytest.mark.parametrize("body", [{"client_id": 5}, {"client_id": ["a"]}, {"client_id": {"a": 1}},
                                  {"extra_data": {"client_id": 7}}, {"extra_data": {"client_id": []}}])
def test_client_id_must_be_a_string(server, body):
    assert_400(server.post("/prompt", {"prompt": simple_prompt(), **body}), "invalid_prompt")


def test_null_client_id_is_accepted(server):
    queued = server.queue_prompt(simple_prompt(5), client_id=None, extra_data={"client_id": None})
    assert server.wait_history(queued["prompt_id"])["status"]["status_str"] == "success"


@pytest.mark.parametrize("query", ["max_items=abc", "offset=1.5", "offset=x&max_items=1", "max_items="])
def test_history_paging_parameters_must_be_integers(server, query):
    assert_400(server.get(f"/history?{query}"))


@pytest.mark.parametrize("path", ["/history", "/queue"])
@pytest.mark.parametrize("body", [[1, 2], "clear", 5, {"delete": "abc"}, {"delete": [["x"]]},
                                  {"delete": [{}]}, {"delete": 3}])
def test_history_and_queue_bodies_are_checked(server, path, body):
    assert_400(server.post(path, body))


@pytest.mark.parametrize("text", ["", "[]", '"x"', "{bad", "5"])
def test_free_body_must_be_a_json_object(server, text):
    assert_400(post_raw(server, "/free", text))


def test_well_formed_bodies_still_work(server):
    assert server.post("/queue", {"delete": ["nothing-here"]}).status_code == 200
    assert server.post("/history", {"delete": ["nothing-here"]}).status_code == 200
    assert server.post("/free", {"unload_models": False}).status_code == 200
    assert server.get("/history?max_items=1&offset=0").status_code == 200
