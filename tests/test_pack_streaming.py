"""Node pack HTTP handlers that stream, through the real server (issue #9): server-sent events and other
`web.StreamResponse` bodies reach the client while the handler writes them (arrival times show nothing is
buffered), a client that leaves cancels the handler, `web.FileResponse` is sent from disk in pieces, and pack
WebSocket handlers (`web.WebSocketResponse`) work through the front, next to its own /ws."""

from __future__ import annotations

import json
import time

import pytest
import requests
import websocket

from conftest import Server, wait_until

PACK = "comfy_style/streaming_pack"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("stream-pack"), ("--warmup", "background"), packs=(PACK,))
    wait_until(lambda: server.get("/system_stats").json()["comfy_serverless"]["warmup"]["state"] == "done",
               timeout=120, what="warm-up")
    yield server
    server.stop()


def timed_chunks(response) -> list[tuple[float, bytes]]:
    """Each piece of a streamed body with the time it arrived, seconds after the first."""
    arrived = []
    for chunk in response.iter_content(chunk_size=None):
        arrived.append((time.monotonic(), chunk))
    start = arrived[0][0]
    return [(round(at - start, 3), chunk) for at, chunk in arrived]


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append(fields)
    return events


def test_server_sent_events_arrive_as_the_handler_writes_them(srv):
    before = srv.get("/stream_pack/ended").json()["finished"]
    with srv.http.get(srv.url + "/stream_pack/events?count=4&gap=0.4", stream=True) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.headers
        chunks = timed_chunks(response)
    events = sse_events(b"".join(chunk for _, chunk in chunks).decode())
    assert [e.get("data") for e in events] == [json.dumps({"n": n}) for n in range(4)] + ["{}"]
    assert [e["event"] for e in events] == ["tick"] * 4 + ["done"]
    # one chunk per write, spaced by the handler's sleeps: 4 gaps of 0.4 s between the first and the last
    assert len(chunks) == 5, chunks
    times = [at for at, _ in chunks]
    assert times[-1] >= 1.4, times
    assert all(later - earlier >= 0.3 for earlier, later in zip(times, times[1:])), times
    assert srv.get("/stream_pack/ended").json()["finished"] == before + 1


def test_the_front_answers_while_a_stream_is_open(srv):
    with srv.http.get(srv.url + "/stream_pack/events?count=3&gap=0.5", stream=True) as response:
        pieces = response.iter_content(chunk_size=None)
        first = next(pieces)
        assert first.startswith(b"id: 0")
        started = time.monotonic()
        assert requests.get(srv.url + "/system_stats", timeout=5).status_code == 200
        assert requests.get(srv.url + "/stream_pack/ended", timeout=5).status_code == 200
        assert time.monotonic() - started < 0.5
        rest = b"".join(pieces)
    assert rest.endswith(b"event: done\ndata: {}\n\n")


def test_a_client_that_leaves_cancels_an_endless_stream(srv):
    before = srv.get("/stream_pack/ended").json()["cancelled"]
    response = srv.http.get(srv.url + "/stream_pack/endless", stream=True)
    received = b""
    for chunk in response.iter_content(chunk_size=None):
        received += chunk
        if received.count(b"\n\n") >= 3:
            break
    response.close()
    assert received.startswith(b"data: 0\n\ndata: 1\n\n")
    wait_until(lambda: srv.get("/stream_pack/ended").json()["cancelled"] > before, timeout=10,
               what="the handler noticing the client left")
    assert srv.get("/stream_pack/events?count=1&gap=0").status_code == 200


def test_a_compressed_stream_still_arrives_piece_by_piece(srv):
    with srv.http.post(srv.url + "/stream_pack/gzip", data="alpha beta gamma", stream=True,
                       headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["content-encoding"] == "gzip"
        chunks = timed_chunks(response)  # requests un-gzips as the pieces come
    assert b"".join(chunk for _, chunk in chunks) == b"alpha\nbeta\ngamma\n"
    assert [chunk for _, chunk in chunks][:3] == [b"alpha\n", b"beta\n", b"gamma\n"]
    assert chunks[2][0] >= 0.5, chunks


def test_a_stream_that_fails_half_way_is_cut_not_completed(srv):
    with srv.http.get(srv.url + "/stream_pack/fails", stream=True) as response:
        assert response.status_code == 200
        received = b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in response.iter_content(chunk_size=None):
                received += chunk
    assert received == b"first part\n"  # the client can tell the body is incomplete: no last chunk came
    wait_until(lambda: "the stream broke half-way" in srv.log(), timeout=5, what="the traceback in the log")
    assert srv.get("/stream_pack/ended").status_code == 200


def test_file_responses_are_sent_from_disk_not_collected(srv):
    size = 96 * 1024 * 1024
    path = srv.base / "input" / "big.bin"
    with open(path, "wb") as fh:  # sparse: costs no disk, but collecting it would cost 96 MB of memory
        fh.truncate(size)
        fh.seek(60 * 1024 * 1024)
        fh.write(b"marker")
    rss_before = srv.rss_mb()
    with srv.http.get(srv.url + "/stream_pack/big/big.bin", stream=True) as response:
        assert response.status_code == 200 and int(response.headers["content-length"]) == size
        first = response.raw.read(65536)
        rss_while = srv.rss_mb()
        total = len(first) + sum(len(chunk) for chunk in response.iter_content(1 << 20))
    assert first == b"\0" * 65536 and total == size
    assert rss_while - rss_before < 32, (rss_before, rss_while)
    part = srv.get("/stream_pack/big/big.bin", headers={"Range": f"bytes={60 * 1024 * 1024}-{60 * 1024 * 1024 + 5}"})
    assert part.status_code == 206 and part.content == b"marker"
    assert srv.get("/stream_pack/big/none.bin").status_code == 404


def ws_url(srv, path: str) -> str:
    return srv.url.replace("http://", "ws://") + path


def test_a_pack_websocket_handler_talks_through_the_front(srv):
    front = srv.ws()  # the front's own /ws, open at the same time
    for path in ("/stream_pack/ws?name=bob", "/api/stream_pack/ws?name=bob"):
        ws = websocket.create_connection(ws_url(srv, path), timeout=10)
        try:
            assert json.loads(ws.recv()) == {"hello": "bob", "peer": "127.0.0.1"}
            ws.send("quiet please")
            assert ws.recv() == "QUIET PLEASE"
            ws.send(json.dumps({"a": [1, 2]}))
            assert json.loads(ws.recv()) == {"echo": {"a": [1, 2]}}
            ws.send_binary(b"\x01\x02\x03")
            assert ws.recv() == b"\x03\x02\x01"
            ws.send("close")
            opcode, frame = ws.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE
            assert int.from_bytes(frame[:2], "big") == 4000 and frame[2:] == b"asked to"
        finally:
            ws.close()
    assert front.until(lambda m: m["type"] == "status")  # the front's socket was unaffected
    front.close()
    assert srv.get("/system_stats").status_code == 200


def test_a_pack_websocket_pushes_messages_over_time(srv):
    ws = websocket.create_connection(ws_url(srv, "/stream_pack/ticker/3"), timeout=10)
    arrived = []
    try:
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            arrived.append((time.monotonic(), data.decode()))
    finally:
        ws.close()
    assert [text for _, text in arrived] == ["tick 0", "tick 1", "tick 2"]
    assert arrived[2][0] - arrived[0][0] >= 0.45
    # routes added to app.router are served at their own path only, as in ComfyUI
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(ws_url(srv, "/api/stream_pack/ticker/3"), timeout=10)
    assert refused.value.status_code == 404


def test_a_plain_request_to_a_websocket_route_is_refused_cleanly(srv):
    answer = srv.get("/stream_pack/ws")
    assert answer.status_code == 400  # aiohttp's WebSocketResponse refuses a request that is not an upgrade
    assert srv.get("/system_stats").status_code == 200
