"""What platforms need beyond ComfyUI: Prometheus metrics, SIGTERM drain, JSON logs."""

import json
import signal

from conftest import wait_until


def slow_prompt(steps=20, value=1):
    return {"1": {"class_type": "Number", "inputs": {"value": value}},
            "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": steps, "step_seconds": 0.05}},
            "3": {"class_type": "Record", "inputs": {"value": ["2", 0]}}}


def parse_metrics(text):
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_in_prometheus_text_format(start_server):
    srv = start_server()
    srv.run({"1": {"class_type": "Number", "inputs": {"value": 1}}, "2": {"class_type": "Record",
                                                                          "inputs": {"value": ["1", 0]}}})
    srv.run({"1": {"class_type": "Fail", "inputs": {"value": 1.0, "message": "x"}},
             "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}})
    response = srv.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values = parse_metrics(response.text)
    assert values['comfy_prompts_total{outcome="success"}'] == 1
    assert values['comfy_prompts_total{outcome="error"}'] == 1
    assert values["comfy_queue_pending"] == 0 and values["comfy_queue_running"] == 0
    assert values["comfy_prompt_duration_seconds_count"] == 2
    assert values['comfy_prompt_duration_seconds_bucket{le="+Inf"}'] == 2
    assert values['comfy_startup_stage_seconds{stage="listening"}'] > 0
    assert values["comfy_process_resident_memory_bytes"] > 10_000_000
    assert "# TYPE comfy_prompt_duration_seconds histogram" in response.text


def test_metrics_count_pending_prompts(start_server):
    srv = start_server()
    first = srv.queue_prompt(slow_prompt(steps=20))
    second = srv.queue_prompt(slow_prompt(steps=2, value=2))
    values = parse_metrics(srv.get("/metrics").text)
    assert values["comfy_queue_pending"] + values["comfy_queue_running"] == 2
    srv.wait_history(second["prompt_id"])
    srv.wait_history(first["prompt_id"])


def is_running(srv, prompt_id):
    return any(item[1] == prompt_id for item in srv.get("/queue").json()["queue_running"])


def test_sigterm_drains_then_exits_zero(start_server):
    srv = start_server("--shutdown-grace", "20")
    running = srv.queue_prompt(slow_prompt(steps=60))  # 3 s: still running when checked below
    queued = srv.queue_prompt(slow_prompt(steps=4, value=2))
    wait_until(lambda: is_running(srv, running["prompt_id"]), what="the first prompt running")
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: srv.get("/ready").status_code == 503, what="/ready turning 503 after SIGTERM")
    refused = srv.post("/prompt", {"prompt": slow_prompt(steps=1, value=3)})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
    ready = srv.get("/ready")
    assert ready.status_code == 503 and "shutting down" in ready.json()["reasons"]
    assert srv.get(f"/history/{running['prompt_id']}").json() == {}  # still running, not killed
    assert srv.proc.wait(30) == 0
    log = srv.log()
    assert "shutting down: 2 prompt(s) left" in log and "prompt finished: success" in log
    assert log.count("prompt finished: success") == 2 and queued


def test_sigterm_grace_period_interrupts(start_server):
    srv = start_server("--shutdown-grace", "0.5")
    running = srv.queue_prompt(slow_prompt(steps=1000))  # 50 s: only an interrupt ends it within the wait below
    srv.queue_prompt(slow_prompt(steps=4, value=2))
    wait_until(lambda: is_running(srv, running["prompt_id"]), what="the first prompt running")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 1  # a prompt was interrupted and one dropped
    log = srv.log()
    assert "interrupted the running prompt, dropped 1 pending" in log
    assert "prompt finished: success" not in log


def test_json_logs_carry_prompt_ids(start_server):
    srv = start_server("--log-format", "json")
    prompt_id = srv.run({"1": {"class_type": "Number", "inputs": {"value": 1}},
                         "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}})["prompt"][1]
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("prompt_id") == prompt_id]
    assert any(line["message"].startswith("prompt finished") for line in mine)
