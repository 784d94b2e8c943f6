"""Execution semantics over the real API: message order, lists, lazy inputs, expansion, blockers, async,
errors, caching (docs/comfy-api-contract.md §1.7 and §3)."""

from conftest import types_of, wait_until


def number(value):
    return {"class_type": "Number", "inputs": {"value": value}}


def record(value, label=""):
    return {"class_type": "Record", "inputs": {"value": value, "label": label}}


def test_message_order_for_one_prompt(server):
    ws = server.ws()
    ws.until(lambda m: m["type"] == "status")
    queued = server.queue_prompt({"1": number(2), "2": record(["1", 0])}, client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    kinds = [t for t in types_of(messages) if t != "progress_state"]
    assert kinds == ["status", "status", "execution_start", "execution_cached", "executing", "executing",
                     "executed", "execution_success", "status", "executing"]
    executed = next(m for m in messages if m["type"] == "executed")
    assert executed["data"] == {"node": "2", "display_node": "2", "output": {"values": [2.0], "labels": [""]},
                                "prompt_id": queued["prompt_id"]}
    states = [m for m in messages if m["type"] == "progress_state"]
    assert states[-1]["data"]["nodes"]["2"]["state"] == "finished"
    assert messages[-2]["data"] == {"status": {"exec_info": {"queue_remaining": 0}}}
    ws.close()


def test_history_entry_shape(server):
    entry = server.run({"1": number(2), "2": record(["1", 0])}, extra_data={"api_key_comfy_org": "secret",
                                                                           "extra_pnginfo": {"k": 1}})
    number_, prompt_id, prompt, extra, outputs = entry["prompt"]
    assert outputs == ["2"] and "api_key_comfy_org" not in extra and extra["extra_pnginfo"] == {"k": 1}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                           "execution_success"]
    assert all("timestamp" in m[1] for m in entry["status"]["messages"])
    assert entry["meta"]["2"] == {"node_id": "2", "display_node": "2", "parent_node": None, "real_node_id": "2"}


def test_prompt_without_client_id_broadcasts_only_progress(server):
    ws = server.ws()
    queued = server.queue_prompt({"1": number(3), "2": record(["1", 0])})
    server.wait_history(queued["prompt_id"])
    ws.until(lambda m: m["type"] == "status" and "sid" not in m["data"]
             and m["data"]["status"]["exec_info"]["queue_remaining"] == 0)
    kinds = set(types_of(ws.messages))
    assert "executing" not in kinds and "executed" not in kinds and "execution_start" not in kinds
    assert "progress_state" in kinds
    ws.close()


def test_output_lists_fan_out_and_input_is_list_gathers(server):
    prompt = {"1": {"class_type": "MakeList", "inputs": {"count": 3}}, "2": record(["1", 0]),
              "3": {"class_type": "RecordList", "inputs": {"value": ["1", 0]}},
              "4": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}}, "5": record(["4", 0])}
    outputs = server.run(prompt)["outputs"]
    assert outputs["2"]["values"] == [0.0, 1.0, 2.0]  # one call per list element, UI lists concatenated
    assert outputs["3"]["values"] == [[0.0, 1.0, 2.0]] and outputs["3"]["labels"] == [3]
    assert outputs["5"]["values"] == [10.0, 11.0, 12.0]


def test_lazy_input_not_requested_never_runs(server):
    prompt = {"1": {"class_type": "Fail", "inputs": {"value": 1.0, "message": "must not run"}},
              "2": number(7),
              "3": {"class_type": "LazySwitch", "inputs": {"use_a": False, "a": ["1", 0], "b": ["2", 0]}},
              "4": record(["3", 0])}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["4"]["values"] == [7.0]


def test_lazy_input_requested_runs(server):
    prompt = {"1": {"class_type": "Fail", "inputs": {"value": 1.0, "message": "lazy ran"}}, "2": number(7),
              "3": {"class_type": "LazySwitch", "inputs": {"use_a": True, "a": ["1", 0], "b": ["2", 0]}},
              "4": record(["3", 0])}
    entry = server.run(prompt)
    error = entry["status"]["messages"][-1]
    assert error[0] == "execution_error" and error[1]["node_id"] == "1"
    assert error[1]["exception_message"] == "lazy ran\n"


def test_subgraph_expansion_with_ephemeral_ids(server):
    ws = server.ws()
    queued = server.queue_prompt({"1": {"class_type": "SumTo", "inputs": {"n": 4}}, "2": record(["1", 0])},
                                 client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    entry = server.wait_history(queued["prompt_id"])
    assert entry["outputs"]["2"]["values"] == [6.0]  # 0 + 1 + 2 + 3
    executing = [m["data"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
    ephemeral = [d for d in executing if d["node"].startswith("1.0.0.")]
    assert ephemeral and all(d["display_node"] == "1" for d in ephemeral)
    states = [m for m in messages if m["type"] == "progress_state"][-1]["data"]["nodes"]
    assert states["1.0.0.1"]["parent_node_id"] == "1" and states["1.0.0.1"]["real_node_id"] == "1"
    ws.close()


def test_dynamic_cycle_is_an_execution_error(server):
    prompt = {"1": number(1), "2": {"class_type": "SelfLoop", "inputs": {"value": ["1", 0]}}, "3": record(["2", 0])}
    entry = server.run(prompt)
    name, data = entry["status"]["messages"][-1]
    assert name == "execution_error" and data["exception_type"] == "graph.DependencyCycleError"
    assert data["exception_message"] == "Dependency cycle detected" and data["node_id"] == "2"


def test_execution_blocker_silent_and_with_message(server):
    ws = server.ws()
    prompt = {"1": number(1), "2": {"class_type": "Block", "inputs": {"value": ["1", 0], "block": True, "message": ""}},
              "3": record(["2", 0]), "4": {"class_type": "Block", "inputs": {"value": ["1", 0], "block": True,
                                                                               "message": "stop here"}},
              "5": record(["4", 0]), "6": record(["1", 0])}
    queued = server.queue_prompt(prompt, client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    entry = server.wait_history(queued["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    assert list(entry["outputs"]) == ["6"]  # blocked outputs produce nothing
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert len(errors) == 1 and errors[0]["exception_message"] == "Execution Blocked: stop here"
    assert errors[0]["exception_type"] == "ExecutionBlocked" and "timestamp" not in errors[0]
    assert "execution_success" in types_of(messages)
    ws.close()


def test_async_nodes_run_concurrently(server):
    ws = server.ws()
    prompt = {str(i): {"class_type": "Sleep", "inputs": {"value": float(i), "seconds": 0.5}} for i in range(1, 4)}
    prompt.update({str(10 + i): record([str(i), 0]) for i in range(1, 4)})
    queued = server.queue_prompt(prompt, client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    entry = server.wait_history(queued["prompt_id"])
    assert sorted(v["values"][0] for v in entry["outputs"].values()) == [1.0, 2.0, 3.0]
    # The three sleeps overlap: all three are running at once, and all start before any result is recorded.
    states = [m["data"]["nodes"] for m in messages if m["type"] == "progress_state"]
    assert any(all(nodes.get(i, {}).get("state") == "running" for i in ("1", "2", "3")) for nodes in states)
    events = [(m["type"], m["data"].get("node")) for m in messages if m["type"] in ("executing", "executed")]
    first_result = next(i for i, (kind, _) in enumerate(events) if kind == "executed")
    assert {("executing", i) for i in ("1", "2", "3")} <= set(events[:first_result])
    ws.close()


def test_node_error_reports_and_keeps_serving(server):
    ws = server.ws()
    prompt = {"1": number(1), "2": {"class_type": "Fail", "inputs": {"value": ["1", 0], "message": "bad thing"}},
              "3": record(["2", 0])}
    queued = server.queue_prompt(prompt, client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert error["node_id"] == "2" and error["node_type"] == "Fail" and error["exception_type"] == "ValueError"
    assert error["exception_message"] == "bad thing\n" and error["executed"] == ["1"]
    assert error["current_inputs"] == {"value": [1.0], "message": ["bad thing"]}
    assert error["traceback"] and sorted(error["current_outputs"]) == ["1", "2", "3"]
    entry = server.wait_history(queued["prompt_id"])
    assert entry["status"] == {"status_str": "error", "completed": False, "messages": entry["status"]["messages"]}
    assert server.run({"1": number(4), "2": record(["1", 0])})["status"]["status_str"] == "success"
    ws.close()


def test_interrupt_stops_the_running_prompt(server):
    ws = server.ws()
    prompt = {"1": number(1), "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 200,
                                                                          "step_seconds": 0.05}},
              "3": record(["2", 0])}
    queued = server.queue_prompt(prompt, client_id=ws.client_id)
    ws.until(lambda m: m["type"] == "progress" and m["data"]["value"] >= 2)
    other = server.post("/interrupt", {"prompt_id": "not-running"})
    assert other.status_code == 200  # a different prompt id: no effect
    ws.until(lambda m: m["type"] == "progress" and m["data"]["value"] >= 4)
    assert server.post("/interrupt", data=b"").status_code == 200
    messages = ws.until_done(queued["prompt_id"])
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "2" and interrupted["node_type"] == "SlowSteps"
    entry = server.wait_history(queued["prompt_id"])
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    progress = [m["data"] for m in ws.messages if m["type"] == "progress"]
    assert progress[0]["max"] == 200 and progress[0]["node"] == "2"
    ws.close()


def test_queue_view_clear_and_delete(server):
    blocker = {"1": number(1), "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 40,
                                                                           "step_seconds": 0.05}},
               "3": record(["2", 0])}
    running = server.queue_prompt(blocker)
    ids = [server.queue_prompt({"1": number(i), "2": record(["1", 0])})["prompt_id"] for i in range(3)]
    queue = server.get("/queue").json()
    assert [item[1] for item in queue["queue_running"]] == [running["prompt_id"]]
    assert sorted(item[1] for item in queue["queue_pending"]) == sorted(ids)
    item = queue["queue_pending"][0]
    assert len(item) == 5 and isinstance(item[2], dict) and isinstance(item[4], list)
    assert server.get("/prompt").json()["exec_info"]["queue_remaining"] == 4
    server.post("/queue", {"delete": [ids[0]]})
    assert ids[0] not in [i[1] for i in server.get("/queue").json()["queue_pending"]]
    server.post("/queue", {"clear": True})
    assert server.get("/queue").json()["queue_pending"] == []
    server.wait_history(running["prompt_id"])


def test_priority_number_and_front(server):
    blocker = {"1": number(1), "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 10,
                                                                           "step_seconds": 0.05}},
               "3": record(["2", 0])}
    server.queue_prompt(blocker)
    late = server.queue_prompt({"1": number(1), "2": record(["1", 0])}, number=1000)
    early = server.queue_prompt({"1": number(2), "2": record(["1", 0])}, number=-5)
    front = server.queue_prompt({"1": number(3), "2": record(["1", 0])}, front=True)
    assert late["number"] == 1000.0 and early["number"] == -5.0 and front["number"] <= 0
    server.wait_history(late["prompt_id"])
    finished = list(server.get("/history").json())
    by_number = sorted((early, front, late), key=lambda q: q["number"])  # front uses -(counter)
    positions = [finished.index(q["prompt_id"]) for q in by_number]
    assert positions == sorted(positions) and by_number[-1] is late


def test_history_paging_and_deletion(start_server):
    srv = start_server()
    ids = [srv.run({"1": number(i), "2": record(["1", 0])})["prompt"][1] for i in range(5)]
    assert list(srv.get("/history").json()) == ids
    assert list(srv.get("/history?max_items=2").json()) == ids[-2:]
    assert list(srv.get("/history?offset=1&max_items=2").json()) == ids[1:3]
    assert list(srv.get("/history?offset=3").json()) == ids[3:]
    assert srv.get("/history?offset=9").json() == {}
    assert srv.get("/history?max_items=abc").status_code == 400  # ComfyUI: 500; no bad input gets a 500 here
    assert srv.get("/history/unknown").json() == {}
    srv.post("/history", {"delete": [ids[0], "nope"]})
    assert list(srv.get("/history").json()) == ids[1:]
    srv.post("/history", {"clear": True})
    assert srv.get("/history").json() == {}


def test_classic_cache_reuses_results_and_reports_cached_nodes(server):
    ws = server.ws()
    prompt = {"1": number(42), "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 0.5}},
              "3": record(["2", 0], "cache-test")}
    first = server.queue_prompt(prompt, client_id=ws.client_id)
    ws.until_done(first["prompt_id"])
    second = server.queue_prompt(prompt, client_id=ws.client_id)
    messages = ws.until_done(second["prompt_id"])
    cached = next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")
    assert cached == ["1", "2", "3"]
    assert not [m for m in messages if m["type"] == "executing" and m["data"]["node"]]
    executed = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed[0]["node"] == "3" and executed[0]["output"]["values"] == [42.5]
    assert server.wait_history(second["prompt_id"])["outputs"]["3"]["values"] == [42.5]
    ws.close()


def test_is_changed_nan_reruns_and_stable_value_caches(server):
    unstable = {"1": {"class_type": "Counter", "inputs": {"stable": False}}, "2": record(["1", 0], "unstable")}
    a = server.run(unstable)["outputs"]["2"]["values"][0]
    b = server.run(unstable)["outputs"]["2"]["values"][0]
    assert b > a
    stable = {"1": {"class_type": "Counter", "inputs": {"stable": True}}, "2": record(["1", 0], "stable")}
    c = server.run(stable)["outputs"]["2"]["values"][0]
    assert server.run(stable)["outputs"]["2"]["values"][0] == c


def test_cache_none_reruns_everything(start_server):
    srv = start_server("--cache-none")
    counter = {"1": {"class_type": "Counter", "inputs": {"stable": True}}, "2": record(["1", 0])}
    first = srv.run(counter)["outputs"]["2"]["values"][0]
    assert srv.run(counter)["outputs"]["2"]["values"][0] == first + 1


def test_cache_lru_keeps_results_across_different_prompts(start_server):
    srv = start_server("--cache-lru", "10")
    a = {"1": {"class_type": "Counter", "inputs": {"stable": True}}, "2": record(["1", 0], "a")}
    b = {"1": number(3), "2": record(["1", 0], "b")}
    first = srv.run(a)["outputs"]["2"]["values"][0]
    srv.run(b)  # classic mode would drop a's results here
    assert srv.run(a)["outputs"]["2"]["values"][0] == first


def test_classic_cache_drops_results_the_next_prompt_does_not_use(start_server):
    srv = start_server()
    a = {"1": {"class_type": "Counter", "inputs": {"stable": True}}, "2": record(["1", 0], "a")}
    b = {"1": number(3), "2": record(["1", 0], "b")}
    first = srv.run(a)["outputs"]["2"]["values"][0]
    srv.run(b)
    assert srv.run(a)["outputs"]["2"]["values"][0] == first + 1


def test_free_memory_resets_caches(start_server):
    srv = start_server()
    counter = {"1": {"class_type": "Counter", "inputs": {"stable": True}}, "2": record(["1", 0])}
    first = srv.run(counter)["outputs"]["2"]["values"][0]
    assert srv.run(counter)["outputs"]["2"]["values"][0] == first
    assert srv.post("/free", {"free_memory": True}).status_code == 200
    wait_until(lambda: "caches and models freed" in srv.log(), what="the idle worker applying /free")
    assert srv.run(counter)["outputs"]["2"]["values"][0] == first + 1
    assert srv.post("/free", data=b"").status_code == 400  # the body must be a JSON object (ComfyUI: 500)


def test_identical_subgraphs_under_different_ids_share_results(server):
    prompt = {"1": {"class_type": "Counter", "inputs": {"stable": True}}, "2": record(["1", 0], "x"),
              "3": {"class_type": "Counter", "inputs": {"stable": True}}, "4": record(["3", 0], "y")}
    outputs = server.run(prompt)["outputs"]
    assert outputs["2"]["values"] == outputs["4"]["values"]


def _preview_prompt():
    return {"1": number(1), "2": {"class_type": "PreviewSteps", "inputs": {"value": ["1", 0], "steps": 2}},
            "3": record(["2", 0], "preview")}


def test_binary_preview_frames(server):
    import io
    import struct

    from PIL import Image

    ws = server.ws()
    queued = server.queue_prompt(_preview_prompt(), client_id=ws.client_id)
    ws.until_done(queued["prompt_id"])
    frames = [m for m in ws.messages if isinstance(m, bytes)]
    assert len(frames) == 2
    event, image_format = struct.unpack(">II", frames[0][:8])
    assert (event, image_format) == (1, 1)  # PREVIEW_IMAGE, JPEG
    image = Image.open(io.BytesIO(frames[0][8:]))
    assert image.format == "JPEG" and image.size == (512, 256)  # scaled to fit --preview-size
    ws.close()


def test_preview_size_flag_bounds_the_preview_frames(start_server):
    import io

    from PIL import Image

    srv = start_server("--preview-size", "100")
    ws = srv.ws()
    queued = srv.queue_prompt(_preview_prompt(), client_id=ws.client_id)
    ws.until_done(queued["prompt_id"])
    frames = [m for m in ws.messages if isinstance(m, bytes)]
    assert len(frames) == 2
    # The node offers 600x300 and asks for at most 512; the server's --preview-size 100 is smaller and wins.
    assert Image.open(io.BytesIO(frames[0][8:])).size == (100, 50)
    ws.close()


def test_preview_frames_with_metadata_after_feature_negotiation(server):
    import json
    import struct

    ws = server.ws()
    ws.recv()
    ws.sock.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    assert ws.recv()["type"] == "feature_flags"
    prompt = _preview_prompt()
    prompt["2"]["inputs"]["steps"] = 3  # not cached from the previous test
    queued = server.queue_prompt(prompt, client_id=ws.client_id)
    ws.until_done(queued["prompt_id"])
    frame = next(m for m in ws.messages if isinstance(m, bytes))
    event, length = struct.unpack(">II", frame[:8])
    metadata = json.loads(frame[8:8 + length])
    assert event == 4 and metadata["node_id"] == "2" and metadata["prompt_id"] == queued["prompt_id"]
    assert metadata["image_type"] == "image/jpeg" and frame[8 + length:10 + length] == b"\xff\xd8"
    ws.close()


def test_reconnect_during_execution_reports_the_running_node(server):
    slow = {"1": number(1), "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 30,
                                                                        "step_seconds": 0.05}},
            "3": record(["2", 0], "reconnect")}
    ws = server.ws("reconnecting")
    queued = server.queue_prompt(slow, client_id="reconnecting")
    ws.until(lambda m: m["type"] == "progress")
    ws.close()
    again = server.ws("reconnecting")
    first, second = again.recv(), again.recv()
    assert first["type"] == "status" and second == {"type": "executing", "data": {"node": "2"}}
    again.until_done(queued["prompt_id"])
    again.close()


def _stateful(tag):
    return {"1": {"class_type": "Stateful", "inputs": {"tag": tag}}, "2": record(["1", 0], tag)}


def test_node_instances_are_reused_across_prompts(start_server):
    srv = start_server()
    assert srv.run(_stateful("a"))["outputs"]["2"]["values"] == [1]
    assert srv.run(_stateful("a"))["outputs"]["2"]["values"] == [2]  # same id and class: same object
    other = {"9": {"class_type": "Number", "inputs": {"value": 1}}, "8": record(["9", 0], "other")}
    srv.run(other)  # node 1 absent from this prompt: its instance is dropped
    assert srv.run(_stateful("a"))["outputs"]["2"]["values"] == [1]


def test_cache_none_recreates_node_instances(start_server):
    srv = start_server("--cache-none")
    assert srv.run(_stateful("b"))["outputs"]["2"]["values"] == [1]
    assert srv.run(_stateful("b"))["outputs"]["2"]["values"] == [1]


def test_expansion_reusing_an_existing_id_is_an_execution_error(server):
    prompt = {"1": number(5), "2": {"class_type": "ClashingExpand", "inputs": {"value": ["1", 0]}},
              "3": record(["2", 0], "clash")}
    entry = server.run(prompt)
    name, data = entry["status"]["messages"][-1]
    assert name == "execution_error" and data["node_id"] == "2"
    assert data["exception_type"].endswith("DuplicateNodeError")
    assert "Attempt to add duplicate node 1" in data["exception_message"]
