"""`/ws` limits (issue #7): message size, slow readers, pings, bad upgrades and malformed frames.

Raw sockets with hand-built frames, because the misbehaviour under test is exactly what a well-behaved client
library refuses to do.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time
import uuid

import websocket

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame; clients must mask (RFC 6455 5.3)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked_payload = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked_payload


class RawWS:
    """A WebSocket client on a plain socket: sends whatever bytes it is given, parses server frames."""

    def __init__(self, port: int, client_id: str | None = None, rcvbuf: int | None = None, pipelined: bytes = b""):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: caps the window
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /ws?clientId={client_id or uuid.uuid4().hex} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          f"Sec-WebSocket-Version: 13\r\n\r\n".encode() + pipelined)
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._need(8))[0]
        return b0 & 0x0F, self._need(n)

    def read_until(self, opcode: int, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op, payload = self.read_frame()
            if op == opcode:
                return payload
        raise TimeoutError(f"no frame with opcode {opcode}")

    def wait_closed(self, timeout: float = 10) -> None:
        """Reads (and discards) until the server ends the TCP connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return
            except (ConnectionResetError, BrokenPipeError):
                return
            except socket.timeout:
                pass
        raise TimeoutError("the server kept the connection open")

    def close(self) -> None:
        self.sock.close()


def close_code(payload: bytes) -> int:
    return struct.unpack(">H", payload[:2])[0]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def still_serving(srv) -> None:
    assert srv.get("/health").status_code == 200
    prompt = {"1": {"class_type": "Number", "inputs": {"value": float(uuid.uuid4().int % 1000)}},
              "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    assert srv.run(prompt)["status"]["status_str"] == "success"


# -- message size ------------------------------------------------------------------------------------

def test_message_over_limit_gets_close_1009(start_server):
    srv = start_server("--ws-max-message-size", "0.1")  # about 100 KB
    client = RawWS(srv.port)
    chunk = b"a" * 30_000
    data = frame(OP_TEXT, chunk, fin=False) + b"".join(frame(OP_CONT, chunk, fin=False) for _ in range(9))
    client.sock.sendall(data)  # 300 KB, never finished
    assert close_code(client.read_until(OP_CLOSE)) == 1009
    client.wait_closed()
    still_serving(srv)
    ws = srv.ws()
    assert ws.recv()["type"] == "status"
    ws.close()


def test_endless_fragmented_message_is_cut_at_default_limit_with_bounded_memory(start_server):
    srv = start_server()  # default limit: 4 MB
    client = RawWS(srv.port)
    client.read_until(OP_TEXT)  # the status greeting
    before = rss_kb(srv.proc.pid)
    chunk = b"x" * 65536
    sent, code = 0, None
    client.sock.sendall(frame(OP_TEXT, chunk, fin=False))
    while sent < 50 * 1024 * 1024:
        client.sock.sendall(frame(OP_CONT, chunk, fin=False))
        sent += len(chunk)
        if select.select([client.sock], [], [], 0)[0]:
            code = close_code(client.read_until(OP_CLOSE))
            break
    if code is None:
        code = close_code(client.read_until(OP_CLOSE))
    growth_mb = (rss_kb(srv.proc.pid) - before) / 1024
    print(f"sent {sent / 2**20:.1f} MB before the close; server RSS grew {growth_mb:.1f} MB")
    assert code == 1009
    assert sent < 50 * 1024 * 1024
    assert growth_mb < 40
    client.wait_closed()
    still_serving(srv)


def test_oversized_binary_message_is_refused_too(start_server):
    srv = start_server("--ws-max-message-size", "0.1")
    client = RawWS(srv.port)
    client.sock.sendall(frame(OP_BINARY, b"\0" * 200_000))
    assert close_code(client.read_until(OP_CLOSE)) == 1009
    client.wait_closed()


# -- clients that do not read -------------------------------------------------------------------------

def test_client_that_never_reads_is_dropped(start_server):
    srv = start_server("--ws-max-send-buffer", "0.5")
    slow_id = "slow-" + uuid.uuid4().hex[:8]
    slow = RawWS(srv.port, slow_id, rcvbuf=4096)  # reads its handshake, then nothing more
    before = rss_kb(srv.proc.pid)
    dropped = f"dropping websocket client {slow_id}"
    sent = 0
    while dropped not in srv.log() and sent < 16 * 1024 * 1024:  # far more than kernel buffers absorb
        for i in range(40):  # each `executed` message carries its ~50 KB label to the client that won't read
            label = f"{sent}:{i}:" + "y" * 50_000
            prompt = {"1": {"class_type": "Number", "inputs": {"value": float(i)}},
                      "2": {"class_type": "Record", "inputs": {"value": ["1", 0], "label": label}}}
            last = srv.queue_prompt(prompt, client_id=slow_id)["prompt_id"]
            sent += len(label)
        srv.wait_history(last)
        deadline = time.monotonic() + 2
        while dropped not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert dropped in srv.log()
    slow.wait_closed(timeout=30)  # what reached its socket, then the reset
    growth_mb = (rss_kb(srv.proc.pid) - before) / 1024
    print(f"dropped after {sent / 2**20:.1f} MB of results; server RSS grew {growth_mb:.1f} MB (history included)")
    assert growth_mb < 40
    still_serving(srv)


# -- pings --------------------------------------------------------------------------------------------

def test_silent_client_gets_pinged_then_disconnected(start_server):
    srv = start_server("--ws-ping-interval", "0.3", "--ws-ping-timeout", "1")
    silent = RawWS(srv.port)
    silent.read_until(OP_PING)
    silent.wait_closed()  # it never answered


def test_client_that_answers_pings_stays_connected(start_server):
    srv = start_server("--ws-ping-interval", "0.3", "--ws-ping-timeout", "1")
    ws = srv.ws()
    ws.sock.settimeout(10)
    pings = 0
    while pings < 4:  # websocket-client answers each ping with a pong as it reads
        opcode, _ = ws.sock.recv_data_frame(True)
        pings += opcode == websocket.ABNF.OPCODE_PING
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 3.0}},
              "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    queued = srv.queue_prompt(prompt, client_id=ws.client_id)
    assert any(m["type"] == "executed" for m in ws.until_done(queued["prompt_id"]))
    ws.close()


# -- upgrade requests ---------------------------------------------------------------------------------

def upgrade_reply(port: int, extra_headers: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"{extra_headers}\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_invalid_upgrade_requests_get_400(start_server):
    srv = start_server()
    no_key = upgrade_reply(srv.port, "Sec-WebSocket-Version: 13\r\n")
    assert no_key.startswith(b"HTTP/1.1 400"), no_key
    assert b"Sec-WebSocket-Key" in no_key.split(b"\r\n\r\n", 1)[1]
    key = base64.b64encode(os.urandom(16)).decode()
    wrong_version = upgrade_reply(srv.port, f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 8\r\n")
    assert wrong_version.startswith(b"HTTP/1.1 400"), wrong_version
    assert b"sec-websocket-version: 13" in wrong_version.lower()
    for bad_key in ("!!not base64!!", "c2hvcnQ=", f"{key}, {key}"):  # not 16 bytes, or sent twice
        reply = upgrade_reply(srv.port, f"Sec-WebSocket-Key: {bad_key}\r\nSec-WebSocket-Version: 13\r\n")
        assert reply.startswith(b"HTTP/1.1 400"), (bad_key, reply)
    still_serving(srv)
    assert "Traceback" not in srv.log()


# -- malformed frames ---------------------------------------------------------------------------------

BAD_FRAMES = {  # name: (bytes, close code the server should answer with)
    "unmasked": (frame(OP_TEXT, b'{"type": "x"}', masked=False), 1002),
    "reserved opcode": (frame(0x3, b"hello"), 1002),
    "invalid utf-8": (frame(OP_TEXT, b"\xff\xfe not utf-8"), 1007),
}


def test_malformed_frames_close_only_that_connection(start_server):
    srv = start_server()
    observer = srv.ws()
    observer.recv()
    clients = []
    for name, (data, code) in BAD_FRAMES.items():
        after = RawWS(srv.port)  # the bad frame after the handshake completed
        after.sock.sendall(data)
        clients.append((name + " (after handshake)", after, code))
        # the same frame sent in the handshake's packet, then a close frame and more bytes
        pipelined = RawWS(srv.port, pipelined=data + frame(OP_CLOSE, struct.pack(">H", 1000)))
        clients.append((name + " (pipelined)", pipelined, code))
    clean_close = RawWS(srv.port, pipelined=frame(OP_CLOSE, struct.pack(">H", 1000)))
    clean_close.sock.sendall(frame(OP_TEXT, b"after close"))
    clients.append(("close then data", clean_close, 1000))
    for name, client, code in clients:
        assert close_code(client.read_until(OP_CLOSE)) == code, name
        client.wait_closed()
        client.close()
    queued = srv.queue_prompt({"1": {"class_type": "Number", "inputs": {"value": 5.0}},
                               "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}},
                              client_id=observer.client_id)
    assert any(m["type"] == "executed" for m in observer.until_done(queued["prompt_id"]))
    observer.close()
    assert "Traceback" not in srv.log()
