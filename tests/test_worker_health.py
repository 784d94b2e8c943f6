"""The prompt worker survives anything a prompt does, is supervised and reported by the probes; history is
written before a prompt's final messages; SIGTERM accounts for every prompt; /metrics always parses."""

import asyncio
import json
import re
import signal
import threading
import time

import pytest

from comfy_serverless import cli, context
from comfy_serverless.adapters import workflow_runner
from comfy_serverless.server import metrics as metrics_module
from comfy_serverless.server.app import App
from conftest import metric_values, number, record, simple_prompt, wait_until

SHUTDOWN_MESSAGE = "server shut down before the prompt ran"


def waiting_prompt(path, value=1.0):
    return {"1": number(value), "2": {"class_type": "WaitForFile", "inputs": {
        "value": ["1", 0], "path": str(path), "timeout": 60.0}}, "3": record(["2", 0])}


# -- the worker survives -------------------------------------------------------------------------------
def test_deeply_nested_extra_data_does_not_kill_the_worker(start_server):
    srv = start_server("--max-json-depth", "100000")
    deep = {}
    for _ in range(500):
        deep = {"a": deep}
    response = srv.post("/prompt", {"prompt": simple_prompt(2), "extra_data": {"deep": deep}})
    assert response.status_code == 200, response.text
    first = srv.wait_history(response.json()["prompt_id"], timeout=30)
    assert first["status"]["status_str"] == "success"
    after = srv.run(simple_prompt(3))
    assert after["status"]["status_str"] == "success" and after["outputs"]["2"]["values"] == [3]
    assert srv.get("/health").status_code == 200 and srv.get("/ready").status_code == 200
    values = metric_values(srv.get("/metrics").text)
    assert values["comfy_worker_up"] == 1 and values["comfy_worker_restarts_total"] == 0


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "BaseException"])
def test_base_exception_from_a_node_fails_only_that_prompt(start_server, kind):
    srv = start_server()
    ws = srv.ws()
    prompt = {"1": number(1), "2": {"class_type": "RaiseBase", "inputs": {"value": ["1", 0], "kind": kind}},
              "3": record(["2", 0])}
    queued = srv.queue_prompt(prompt, client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert errors and errors[-1]["prompt_id"] == queued["prompt_id"] and errors[-1]["exception_type"] == kind
    entry = srv.wait_history(queued["prompt_id"], timeout=30)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    last_event, data = entry["status"]["messages"][-1]
    assert last_event == "execution_error" and data["exception_type"] == kind
    assert data["prompt_id"] == queued["prompt_id"] and "timestamp" in data
    assert srv.run(simple_prompt(4))["status"]["status_str"] == "success"  # the worker goes on
    values = metric_values(srv.get("/metrics").text)
    assert values["comfy_worker_up"] == 1 and values['comfy_prompts_total{outcome="error"}'] == 1
    ws.close()


# -- supervision, in process (nothing a prompt does can kill the real worker) ---------------------------
@pytest.fixture
def app(tmp_path):
    settings = cli.parse("serve", ["--base-directory", str(tmp_path), "--port", "0",
                                   "--worker-stall-timeout", "5"])
    app = App(settings, [])
    app.loop = app.worker.loop = asyncio.new_event_loop()
    yield app
    app.worker.stopping = True
    app.loop.close()


def run_handler(app, method, path):
    routes = {}

    class Capture:
        def add(self, method, path, handler, api_alias=True):
            routes[(method, path)] = handler

        def __getattr__(self, name):  # other registration helpers are not needed here
            return lambda *args, **kwargs: None

    from comfy_serverless.server.routes import register_routes

    register_routes(Capture(), app)
    response = asyncio.run(routes[(method, path)](None))
    return response.status, json.loads(response.body)


def test_supervisor_restarts_a_dead_worker_and_fails_its_prompt(app):
    app.queue.put([0, "orphan", {}, {}, []])
    release = threading.Event()

    def dying_worker():
        app.queue.get(timeout=5)  # takes the prompt, then the thread ends without finishing it

    worker = app.worker
    worker._loop_forever = dying_worker
    worker.start()
    worker._thread.join(5)
    assert not worker.up
    assert any("not running" in reason for reason in worker.problems())
    worker._loop_forever = lambda: release.wait(30)
    try:
        worker.check()
        assert worker.up and worker.restarts == 1 and worker.problems() == []
        entry = app.queue.history_entry("orphan")["orphan"]
        assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
        assert entry["status"]["messages"][-1][0] == "execution_error"
        assert app.queue.running() == [] and app.queue.remaining() == 0
        values = metric_values(app.metrics.render(0, 0, app.context, worker.up, worker.restarts,
                                                  worker.seconds_since_progress()).decode())
        assert values["comfy_worker_up"] == 1 and values["comfy_worker_restarts_total"] == 1
    finally:
        release.set()


def test_a_worker_that_keeps_dying_fails_health(app):
    worker = app.worker
    worker._loop_forever = lambda: None
    worker.start()
    for _ in range(20):
        worker._thread.join(5)
        worker.check()
        if worker.dead_for_good():
            break
    assert worker.dead_for_good() and not worker.up
    status, body = run_handler(app, "GET", "/health")
    assert status == 503 and body["status"] == "error" and body["reasons"]
    status, body = run_handler(app, "GET", "/ready")
    assert status == 503 and any("could not be restarted" in reason for reason in body["reasons"])


def test_ready_reports_a_worker_stuck_between_prompts(app):
    release = threading.Event()
    worker = app.worker
    worker._loop_forever = lambda: release.wait(30)  # alive but never takes a prompt
    worker.start()
    try:
        app.queue.put([0, "waiting", {}, {}, []])
        assert worker.problems() == []
        worker._beat = time.monotonic() - 60
        problems = worker.problems()
        assert problems and "pending" in problems[0]
        worker._prompt = "running-one"  # now a prompt runs with no engine event for 60 s (> 5 s)
        problems = worker.problems()
        assert problems and "no progress" in problems[0]
        worker._beat = time.monotonic()
        assert worker.problems() == []
    finally:
        release.set()


def test_ready_reports_a_stalled_prompt(start_server, tmp_path):
    srv = start_server("--worker-stall-timeout", "0.5")
    release = tmp_path / "release"
    queued = srv.queue_prompt(waiting_prompt(release))

    def stuck():
        response = srv.get("/ready")
        return response.status_code == 503 and any("stuck" in r for r in response.json()["reasons"])

    try:
        wait_until(stuck, what="/ready reporting the stall")
        assert srv.get("/health").status_code == 200  # stuck is not dead
        assert metric_values(srv.get("/metrics").text)["comfy_worker_seconds_since_progress"] > 0.5
    finally:
        release.touch()
    assert srv.wait_history(queued["prompt_id"])["status"]["status_str"] == "success"
    wait_until(lambda: srv.get("/ready").status_code == 200, what="/ready recovering")


# -- history before the final messages --------------------------------------------------------------------
def test_history_is_written_before_execution_success_is_sent(start_server):
    srv = start_server()
    # Widens the gap between a prompt's end and the worker's bookkeeping, so a wrong order always shows.
    srv.run({"1": {"class_type": "DelayPromptEnd", "inputs": {"seconds": 0.1}}})
    ws = srv.ws()
    for i in range(30):
        queued = srv.queue_prompt(simple_prompt(100 + i), client_id=ws.client_id)
        prompt_id = queued["prompt_id"]
        ws.until(lambda m: m["type"] == "execution_success" and m["data"].get("prompt_id") == prompt_id)
        assert prompt_id in srv.get(f"/history/{prompt_id}").json(), f"prompt {i}: no history yet"
        messages = ws.until_done(prompt_id)
        assert "execution_success" not in [m["type"] for m in messages]  # sent once, before executing null
    ws.close()


def test_runner_waits_briefly_for_a_late_history_entry(monkeypatch):
    answers = [{}, {}, {"p1": {"outputs": {}, "status": {"status_str": "success"}}}]
    calls = []

    def fake_json(base_url, method, path, payload=None, timeout=60):
        calls.append(path)
        return 200, answers[min(len(calls), len(answers)) - 1]

    monkeypatch.setattr(workflow_runner, "_json", fake_json)
    entry = workflow_runner.wait_for_history("http://127.0.0.1:1", "p1", wait=30, interval=0.001)
    assert entry["status"]["status_str"] == "success" and calls == ["/history/p1"] * 3
    answers[:] = [{}]
    with pytest.raises(workflow_runner.WorkflowError, match="no history entry"):
        workflow_runner.wait_for_history("http://127.0.0.1:1", "p2", wait=0.05, interval=0.001)


# -- SIGTERM --------------------------------------------------------------------------------------------
def test_sigterm_records_dropped_prompts_and_exits_1(start_server, tmp_path):
    srv = start_server("--shutdown-grace", "0.5")
    release = tmp_path / "release"
    ws = srv.ws()
    running = srv.queue_prompt(waiting_prompt(release), client_id=ws.client_id)["prompt_id"]
    wait_until(lambda: srv.get("/queue").json()["queue_running"], what="the prompt starting")
    pending = [srv.queue_prompt(simple_prompt(v), client_id=ws.client_id)["prompt_id"] for v in (21, 22)]
    try:
        srv.proc.send_signal(signal.SIGTERM)
        told = set()

        def both_told(message):
            if message["type"] == "execution_error" and message["data"].get("prompt_id") in pending:
                assert message["data"]["exception_message"] == SHUTDOWN_MESSAGE
                told.add(message["data"]["prompt_id"])
            return told == set(pending)

        ws.until(both_told, timeout=30)
        # The server waits for the running prompt (blocked on the file), so /history is still served.
        for prompt_id in pending:
            entry = srv.get(f"/history/{prompt_id}").json()[prompt_id]
            assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
            event, data = entry["status"]["messages"][-1]
            assert event == "execution_error" and data["exception_message"] == SHUTDOWN_MESSAGE
    finally:
        release.touch()
    assert srv.proc.wait(30) == 1
    log = srv.log()
    assert all(prompt_id in log for prompt_id in pending) and "dropped 2 pending" in log
    assert "prompt finished: interrupted" in log and f"interrupted at shutdown: {running}" in log
    ws.close()


def test_sigterm_exits_0_when_everything_finished(start_server):
    srv = start_server("--shutdown-grace", "30")
    queued = srv.queue_prompt(simple_prompt(31))
    srv.wait_history(queued["prompt_id"])
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0


# -- Prometheus exposition -----------------------------------------------------------------------------
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
LABELS = rf"\{{[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE}(?:,[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE})*\}}"
VALUE = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NaN|[+-]Inf)"
SAMPLE = re.compile(rf"^{NAME}(?:{LABELS})? {VALUE}$")
COMMENT = re.compile(rf"^# (?:HELP {NAME} [^\n]*|TYPE {NAME} (?:counter|gauge|histogram|summary|untyped))$")


def unescape(value):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def test_metrics_escape_every_label_value(tmp_path):
    odd = ['quote"model.safetensors', "back\\slash.ckpt", "new\nline.pt", 'all "\\\n three']
    server = context.ServerContext(cli.parse("serve", ["--base-directory", str(tmp_path)]))
    server.model_load_seconds.update({name: 1.5 for name in odd})
    server.timeline.mark('stage "x"\n')
    server.timeline._stages["ok"] = float("inf")
    metrics = metrics_module.Metrics()
    metrics.prompt_finished('odd"outcome\\\n', 0.2)
    text = metrics.render(1, 0, server, worker_up=False, worker_restarts=2,
                          seconds_since_progress=float("nan")).decode()
    assert text.endswith("\n")
    for line in text.splitlines():
        assert COMMENT.match(line) or SAMPLE.match(line), f"not Prometheus text format: {line!r}"
    found = re.findall(r'^comfy_model_load_seconds\{model="((?:[^"\\]|\\.)*)"\} ', text, re.M)
    assert sorted(unescape(v) for v in found) == sorted(odd)
    assert re.search(r'^comfy_prompts_total\{outcome="odd\\"outcome\\\\\\n"\} 1$', text, re.M)
    values = metric_values(text)
    assert values["comfy_worker_up"] == 0 and values["comfy_worker_restarts_total"] == 2
    assert values['comfy_startup_stage_seconds{stage="ok"}'] == float("inf")
