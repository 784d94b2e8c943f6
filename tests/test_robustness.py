"""Bad input gets ComfyUI's error shape and the server keeps serving (and keeps its queue)."""

import json
import socket
import threading

import requests

from conftest import wait_until


def still_serving(srv):
    assert srv.get("/system_stats").status_code == 200


def test_malformed_json_is_400_and_server_survives(server):
    # ComfyUI answers 500; here no bad input gets a 500 (issue #7), and the body has ComfyUI's error shape.
    for path in ("/prompt", "/history", "/queue", "/free"):
        response = server.post(path, data=b"{not json")
        assert response.status_code == 400, path
        body = response.json()
        assert body["error"]["type"] == "invalid_json" and body["node_errors"] == {}
        assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    still_serving(server)


def test_non_object_bodies_get_clear_errors(server):
    response = server.post("/prompt", [1, 2, 3])
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_prompt"
    response = server.post("/prompt", {"prompt": ["not", "a", "dict"]})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_prompt"
    response = server.post("/prompt", {"prompt": {"1": "oops"}})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_prompt"
    response = server.post("/prompt", {"prompt": {"1": {"class_type": "Record", "inputs": [1]}}})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_prompt"
    response = server.post("/prompt", {"prompt": {}, "extra_data": "x"})
    assert response.status_code == 400
    still_serving(server)


def test_json_posted_as_form_content_type_is_accepted(server):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}}, "2": {"class_type": "Record",
                                                                          "inputs": {"value": ["1", 0]}}}
    response = server.http.post(server.url + "/prompt", data=json.dumps({"prompt": prompt}),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


def test_huge_body_is_413(start_server):
    srv = start_server("--max-upload-size", "0.01")  # about 10 KB
    response = requests.post(srv.url + "/prompt", data=b"x" * 200_000)
    assert response.status_code == 413
    still_serving(srv)


def test_garbage_on_the_socket_gets_400(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = sock.recv(1024)
    assert reply.startswith(b"HTTP/1.1 400")
    still_serving(server)


def test_connection_dropped_mid_request(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro")
    still_serving(server)


def test_bad_websocket_messages_are_ignored(server):
    ws = server.ws()
    ws.recv()  # status
    ws.sock.send("{broken json")
    ws.sock.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    still_serving(server)
    ws.sock.ping(b"hi")
    ws.close()
    still_serving(server)


def test_feature_flags_are_negotiated_on_the_first_message(server):
    ws = server.ws()
    ws.recv()
    ws.sock.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    reply = ws.recv()
    assert reply == {"type": "feature_flags", "data": {"supports_preview_metadata": True,
                                                       "max_upload_size": 104857600}}
    ws.close()


def test_reconnect_with_same_client_id_replaces_socket(server):
    first = server.ws("same-id")
    first.recv()
    second = server.ws("same-id")
    hello = second.recv()
    assert hello["data"]["sid"] == "same-id"
    queued = server.queue_prompt({"1": {"class_type": "Number", "inputs": {"value": 9}},
                                  "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}, client_id="same-id")
    messages = second.until_done(queued["prompt_id"])
    assert any(m["type"] == "executed" for m in messages)
    first.close()
    second.close()


def test_queue_full_answers_503_and_ready_reports_it(start_server):
    srv = start_server("--max-queue-size", "1")
    slow = {"1": {"class_type": "Number", "inputs": {"value": 1}},
            "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 40, "step_seconds": 0.05}},
            "3": {"class_type": "Record", "inputs": {"value": ["2", 0]}}}
    running = srv.queue_prompt(slow)
    wait_until(lambda: srv.get("/queue").json()["queue_running"], timeout=10, what="the first prompt running")
    pending = srv.queue_prompt({**slow, "1": {"class_type": "Number", "inputs": {"value": 2}}})
    rejected = srv.post("/prompt", {"prompt": slow})
    assert rejected.status_code == 503 and rejected.json()["error"]["type"] == "queue_full"
    ready = srv.get("/ready")
    assert ready.status_code == 503 and "queue full" in ready.json()["reasons"][0]
    assert srv.get("/health").status_code == 200
    srv.wait_history(pending["prompt_id"])
    assert srv.get("/ready").status_code == 200
    assert srv.wait_history(running["prompt_id"])["status"]["status_str"] == "success"


def test_many_concurrent_requests(server):
    errors = []

    def hammer():
        session = requests.Session()
        for _ in range(25):
            for path in ("/system_stats", "/queue", "/object_info/Add", "/history?max_items=1"):
                if session.get(server.url + path).status_code != 200:
                    errors.append(path)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
