"""ComfyUI as a second backend, seen from real clients: one server, two engines (comfy_serverless/backend/)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid

import websocket

from conftest import COMMAND, PACKS, REPO, metric_values, simple_prompt, types_of, wait_until

from .conftest import backend_flags


def backend_prompt(value=2.0, steps=3, step_seconds=0.0, preview=False):
    """PrimitiveFloat (both engines) -> BackendTriple -> BackendSteps -> BackendShow (backend only)."""
    return {"1": {"class_type": "PrimitiveFloat", "inputs": {"value": value}},
            "2": {"class_type": "BackendTriple", "inputs": {"value": ["1", 0]}},
            "3": {"class_type": "BackendSteps", "inputs": {"value": ["2", 0], "steps": steps,
                                                            "step_seconds": step_seconds, "preview": preview}},
            "4": {"class_type": "BackendShow", "inputs": {"value": ["3", 0]}}}


def backend_state(srv) -> dict:
    return srv.get("/system_stats").json()["comfy_serverless"]["backend"]


def test_union_catalogue_and_validation_without_starting_the_backend(start_server, comfyui_dir, tmp_path):
    base = tmp_path / "front"
    (base / "custom_nodes").mkdir(parents=True)
    shutil.copy2(PACKS / "engine_test_nodes.py", base / "custom_nodes" / "engine_test_nodes.py")
    flags = backend_flags(comfyui_dir)
    done = subprocess.run([*COMMAND, "snapshot", "--base-directory", str(base), *flags], cwd=str(REPO),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    part = json.loads((base / ".comfy-serverless" / "catalog.comfyui.json").read_text())
    assert "BackendTriple" in part["object_info"] and part["version"] == "0.3.64"

    srv = start_server(*flags, base=base)
    info = srv.get("/object_info").json()
    assert info["BackendTriple"] == part["object_info"]["BackendTriple"]  # the backend's own description
    assert "Number" in info and "BackendShow" in info  # native test pack and backend pack: the union
    assert srv.get("/object_info/BackendSteps").json()["BackendSteps"]["category"] == "backend test"

    too_big = backend_prompt()
    too_big["1"] = {"class_type": "Number", "inputs": {"value": 1.0}}
    too_big["2"]["inputs"]["value"] = 5000.0  # BackendTriple's max is 1000
    answer = srv.post("/prompt", {"prompt": too_big})
    assert answer.status_code == 400
    assert answer.json()["node_errors"]["2"]["errors"][0]["type"] == "value_bigger_than_max"

    mixed = backend_prompt()
    mixed["1"] = {"class_type": "Number", "inputs": {"value": 1.0}}  # only the front has Number
    answer = srv.post("/prompt", {"prompt": mixed})
    assert answer.status_code == 400
    assert "Number exists only in this server" in answer.json()["error"]["message"]

    wrong_link = backend_prompt()
    wrong_link["4"]["inputs"]["value"] = ["1", 5]
    assert srv.post("/prompt", {"prompt": wrong_link}).status_code == 400

    state = backend_state(srv)
    assert state["state"] == "not started" and state["pid"] is None and state["nodes"] == 4
    assert srv.get("/system_stats").json()["comfy_serverless"]["heavy_modules_loaded"] == []


def test_routing_both_ways_with_events_and_history_as_one_server(start_server, comfyui_dir):
    srv = start_server(*backend_flags(comfyui_dir))
    ws, other = srv.ws(), srv.ws()
    native = srv.queue_prompt(simple_prompt(4), client_id=ws.client_id)["prompt_id"]
    ws.until_done(native)
    entry = srv.wait_history(native)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["2"]["values"] == [4.0]
    assert backend_state(srv)["state"] == "not started"  # lazy: nothing has needed it yet

    ws.sock.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    ws.until(lambda m: m["type"] == "feature_flags")
    chosen = f"mine-{uuid.uuid4().hex}"
    answer = srv.queue_prompt(backend_prompt(2.0, steps=3, preview=True), client_id=ws.client_id, prompt_id=chosen)
    assert answer["prompt_id"] == chosen
    messages = ws.until_done(chosen)
    kinds = types_of(messages)
    assert kinds.index("execution_start") < kinds.index("executed") < kinds.index("execution_success")
    assert [m["data"]["value"] for m in messages if not isinstance(m, bytes) and m["type"] == "progress"] == [1, 2, 3]
    executed = [m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "executed"]
    assert executed[0]["node"] == "4" and executed[0]["output"]["values"] == [6.0]
    assert executed[0]["output"]["pid"] != [srv.proc.pid]  # computed by the backend process
    assert all(m["data"].get("prompt_id") == chosen for m in messages
               if not isinstance(m, bytes) and "prompt_id" in m["data"])
    assert "backend_pack.shown" in kinds  # a pack's own message reaches the prompt's client
    previews = [m for m in messages if isinstance(m, bytes)]
    assert len(previews) == 3
    event, size = struct.unpack(">II", previews[0][:8])
    metadata = json.loads(previews[0][8:8 + size])
    assert event == 4 and metadata["prompt_id"] == chosen and metadata["node_id"] == "3"
    assert previews[0][8 + size:8 + size + 2] == b"\xff\xd8"  # the JPEG itself
    assert kinds.count("executing") == 5 and kinds[-1] == "executing"  # nodes 1-4, then one final None

    entry = srv.wait_history(chosen)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["4"]["values"] == [6.0]
    assert entry["prompt"][1] == chosen and entry["prompt"][3]["client_id"] == ws.client_id
    assert set(srv.get("/history").json()) >= {native, chosen}
    assert srv.get("/queue").json() == {"queue_running": [], "queue_pending": []}

    failing = {"1": {"class_type": "PrimitiveFloat", "inputs": {"value": 7.0}},
               "2": {"class_type": "BackendFail", "inputs": {"value": ["1", 0]}},
               "3": {"class_type": "BackendShow", "inputs": {"value": ["2", 0]}}}
    failed = srv.queue_prompt(failing, client_id=ws.client_id)["prompt_id"]
    error = [m for m in ws.until_done(failed) if not isinstance(m, bytes) and m["type"] == "execution_error"]
    assert error[0]["data"]["node_id"] == "2" and "backend node refused 7.0" in error[0]["data"]["exception_message"]
    assert srv.wait_history(failed)["status"]["status_str"] == "error"

    # the other client saw none of those prompts' events
    other.sock.settimeout(0.5)
    seen = []
    try:
        while True:
            seen.append(json.loads(other.sock.recv()))
    except websocket.WebSocketTimeoutException:
        pass
    assert {m["type"] for m in seen} <= {"status"}
    state = backend_state(srv)
    assert state["state"] == "up" and state["prompts"] == 2 and state["boot_seconds"] > 0
    values = metric_values(srv.get("/metrics").text)
    assert values["comfy_backend_up"] == 1 and values["comfy_backend_prompts_total"] == 2
    assert values['comfy_prompts_total{outcome="success"}'] == 2


def test_prefer_comfyui_with_a_client_library_and_shared_output(start_server, comfyui_dir, ws_timeout_30):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    # background: the backend boots after the first answer; its live catalogue then says which twins it runs
    srv = start_server(*backend_flags(comfyui_dir), "--prefer-comfyui", "--warmup", "background")
    wait_until(lambda: backend_state(srv)["catalog_live"], 60, "the backend's live catalogue")
    prefix = f"backend_{uuid.uuid4().hex[:6]}"
    workflow = {"1": {"class_type": "EmptyImage", "_meta": {"title": "Empty"},
                      "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0x336699}},
                "2": {"class_type": "SaveImage", "_meta": {"title": "Save"},
                      "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}
    images = ComfyApiWrapper(srv.url).queue_and_wait_images(ComfyWorkflowWrapper(workflow), "Save")
    name, data = next(iter(images.items()))
    assert name.startswith(prefix) and data[:8] == b"\x89PNG\r\n\x1a\n"  # read through the front's /view
    assert (srv.base / "output" / name).is_file()  # written by the backend into the front's output folder
    info = srv.get("/system_stats").json()["comfy_serverless"]
    assert info["backend"]["prompts"] == 1


def test_interrupt_free_and_queue_limit_cover_the_backend(start_server, comfyui_dir):
    srv = start_server(*backend_flags(comfyui_dir), "--max-queue-size", "1")
    ws = srv.ws()
    slow = srv.queue_prompt(backend_prompt(1.0, steps=2000, step_seconds=0.02), client_id=ws.client_id)["prompt_id"]
    ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == slow)
    srv.queue_prompt(simple_prompt(1))  # pending behind the backend prompt
    refused = srv.post("/prompt", {"prompt": simple_prompt(2)})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "queue_full"
    assert srv.get("/ready").status_code == 503
    assert [item[1] for item in srv.get("/queue").json()["queue_running"]] == [slow]

    assert srv.post("/interrupt", {"prompt_id": slow}).status_code == 200
    messages = ws.until_done(slow)
    assert "execution_interrupted" in types_of(messages)
    entry = srv.wait_history(slow)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"

    assert srv.post("/free", {"free_memory": True}).status_code == 200
    wait_until(lambda: "comfyui: " in srv.log() and "caches and models freed" in srv.log(), 30, "backend /free")


def test_help_and_environment(tmp_path):
    out = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, cwd=str(REPO)).stdout
    for flag in ("--comfyui DIR", "--comfyui-python PATH", "--comfyui-url URL", "--prefer-comfyui"):
        assert flag in out
    assert "COMFY_COMFYUI_URL" in out
    from comfy_serverless.cli import parse

    settings = parse("serve", [], environ={"COMFY_COMFYUI": str(tmp_path), "COMFY_PREFER_COMFYUI": "1"})
    assert settings.comfyui == str(tmp_path) and settings.prefer_comfyui and settings.backend_configured
    assert not parse("serve", [], environ={}).backend_configured
