"""HTTP limits and timeouts: headers, slow or stalled clients, idle connections, the connection cap."""

import socket
import time

import requests


def raw(srv, data: bytes = b"", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, deadline_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    sock.settimeout(deadline_s)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_oversized_header_is_431(server):
    with raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n") as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431")
    assert server.get("/health").status_code == 200


def test_too_many_headers_is_431(server):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    with raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n") as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431")
    assert requests.get(server.url + "/health", headers={f"X-H{i}": "v" for i in range(90)}).status_code == 200


def test_content_length_with_chunked_is_400(server):
    request = (b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\n")
    with raw(server, request) as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400")


def test_rejected_head_requests_are_answered_without_a_body(server):
    big = b"HEAD /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    chunked = b"HEAD /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    for request, status in ((big, b"431"), (chunked, b"400")):
        with raw(server, request) as sock:
            reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 " + status) and reply.endswith(b"\r\n\r\n"), reply
    assert "connection error" not in server.log()


def test_half_sent_headers_get_408_and_close(start_server):
    srv = start_server("--header-timeout", "0.5")
    with raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n") as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


def test_stalled_body_gets_408_and_close(start_server):
    srv = start_server("--body-timeout", "0.5")
    with raw(srv, b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"") as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")
    assert srv.get("/health").status_code == 200


def test_idle_keep_alive_connection_is_closed(start_server):
    srv = start_server("--keep-alive-timeout", "0.5")
    with raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
        reply = read_until_closed(sock)  # the answer, then the close once the connection sat idle
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status": "ok"}')


def test_silent_connection_is_closed_after_the_header_timeout(start_server):
    srv = start_server("--header-timeout", "0.5")
    with raw(srv) as sock:
        assert read_until_closed(sock) == b""  # nothing was asked, so nothing is answered


def test_body_for_an_unknown_path_is_refused_before_it_is_read(server):
    before = server.rss_mb()
    with raw(server, b"POST /no/such/path HTTP/1.1\r\nHost: x\r\nContent-Length: 90000000\r\n\r\n") as sock:
        sock.sendall(b"x" * 65536)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 404")
    assert server.rss_mb() - before < 20


def test_stalled_large_uploads_do_not_pin_memory(start_server):
    """Five clients stop after 40 MB of a 45 MB body: bodies spool to disk instead of memory."""
    srv = start_server("--body-timeout", "60")
    before = srv.rss_mb()
    head = (b"POST /upload/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 47185920\r\n\r\n")
    block = b"y" * (1 << 20)
    sockets = []
    for _ in range(5):
        sock = raw(srv, head, timeout=60)
        for _ in range(40):
            sock.sendall(block)
        sockets.append(sock)
    assert srv.get("/health").status_code == 200
    growth = srv.rss_mb() - before
    for sock in sockets:
        sock.close()
    assert growth < 40, f"server grew by {growth:.0f} MB holding 200 MB of unfinished bodies"


def test_connection_cap_keeps_health_reachable(start_server):
    srv = start_server("--max-connections", "20")
    idle = [raw(srv) for _ in range(40)]  # connect and say nothing
    try:
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        assert requests.get(srv.url + "/queue", timeout=10).status_code == 200  # idle ones made room
    finally:
        for sock in idle:
            sock.close()


def test_connection_cap_when_every_connection_is_busy(start_server):
    srv = start_server("--max-connections", "10", "--header-timeout", "30")
    srv.http.close()  # no idle connection left that could make room
    busy = [raw(srv, b"GET /queue HTTP/1.1\r\nHost: x\r\n") for _ in range(10)]  # heads never finished
    time.sleep(0.5)  # let the server read them: a connection that has sent nothing yet may be closed for room
    try:
        with raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") as probe:
            assert read_until_closed(probe).startswith(b"HTTP/1.1 200")
        with raw(srv, b"GET /queue HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") as other:
            refused = read_until_closed(other)
        assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused
    finally:
        for sock in busy:
            sock.close()
    assert requests.get(srv.url + "/queue", timeout=10).status_code == 200


def test_health_answers_at_the_file_descriptor_limit(start_server):
    """With 128 descriptors, the default cap of 1000 connections would exhaust them; the cap adapts."""
    srv = start_server(launcher=("prlimit", "--nofile=128:128"))
    sockets = [raw(srv) for _ in range(200)]
    try:
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        assert "exceeds what 128 file descriptors allow" in srv.log()
    finally:
        for sock in sockets:
            sock.close()
    assert requests.get(srv.url + "/queue", timeout=10).status_code == 200
