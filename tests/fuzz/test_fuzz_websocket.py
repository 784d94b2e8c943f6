"""Hostile WebSocket traffic on raw sockets: bad upgrade requests, then (after a valid upgrade to
/ws?clientId=...) random opcodes, reserved bits, unmasked frames, fragments without FIN, lying and
oversized length headers, invalid UTF-8, control frames over 125 bytes or fragmented, bad close frames,
random bytes. What the server writes back must be a well-formed HTTP response and well-formed server
frames (or a close), and the connection must end once we stop; the server must be whole afterwards.
A second test streams one never-finished message and watches the server's memory."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import time
from dataclasses import dataclass

import pytest
from hypothesis import strategies as st

from . import support

EXAMPLES = 1300  # each example: one connection, one upgrade, 0-8 frames
TIME_LIMIT_S = 60
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ZERO_KEY = b"\0\0\0\0"
FLOOD_MB = 192  # the unfinished-message memory test sends up to this much
FLOOD_TIME_LIMIT_S = 30
VALID_CLOSE_CODES = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


def mask(payload: bytes, key: bytes) -> bytes:
    if key == ZERO_KEY or not payload:
        return payload
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
          key: bytes = b"\x11\x22\x33\x44", declared: int | None = None, length_form: str = "minimal") -> bytes:
    """One frame as a client writes it; `declared` lies about the length, `length_form` picks the encoding."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 15)])
    bit = 0x80 if masked else 0
    if length_form == "16" or (length_form == "minimal" and 126 <= length < 65536):
        head += bytes([bit | 126]) + struct.pack(">H", length & 0xFFFF)
    elif length_form == "64" or (length_form == "minimal" and length >= 65536):
        head += bytes([bit | 127]) + struct.pack(">Q", length & 0xFFFFFFFFFFFFFFFF)
    else:
        head += bytes([bit | length])
    return head + (key + mask(payload, key) if masked else payload)


def upgrade_request(target: str, key: bytes | None, version: bytes | None, extra: list[bytes],
                    method: bytes = b"GET", http: bytes = b"HTTP/1.1", upgrade: bytes | None = b"websocket",
                    connection: bytes | None = b"Upgrade") -> bytes:
    lines = [method + b" " + target.encode("latin-1") + b" " + http, b"Host: 127.0.0.1"]
    if upgrade is not None:
        lines.append(b"Upgrade: " + upgrade)
    if connection is not None:
        lines.append(b"Connection: " + connection)
    if key is not None:
        lines.append(b"Sec-WebSocket-Key: " + key)
    if version is not None:
        lines.append(b"Sec-WebSocket-Version: " + version)
    return b"\r\n".join(lines + extra) + b"\r\n\r\n"


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


@dataclass
class WSCase:
    upgrade: bytes
    key: bytes
    valid_upgrade: bool  # a correct handshake: the server must answer 101
    must_not_accept: bool  # missing key or a wrong version: the server must not answer 101
    frames: list
    together: bool  # upgrade and frames in one write (exercises the bytes that trail the handshake)
    abort: str | None


client_ids = st.one_of(st.sampled_from(["fuzz", "same", "", "x" * 2000, "%00", "%FF%FE", "a%20b", "..%2F..",
                                        "%E4%B8%AD"]),
                       st.from_regex(r"\A[A-Za-z0-9_-]{1,40}\Z"))
keys = st.binary(min_size=16, max_size=16).map(base64.b64encode)


@st.composite
def upgrades(draw):
    key = draw(keys)
    cid = draw(client_ids)
    target = draw(st.sampled_from(["/ws?clientId=", "/api/ws?clientId=", "/ws?clientId=", "/ws?clientId="])) + cid
    flaw = draw(st.sampled_from([None] * 8 + ["no_key", "bad_key", "short_key", "version_8", "no_version",
                                              "version_list", "no_upgrade", "upgrade_h2c", "conn_keepalive",
                                              "post", "http10", "extensions", "protocol", "body", "no_query",
                                              "dup_key"]))
    version, extra, method, http, upgrade, connection = b"13", [], b"GET", b"HTTP/1.1", b"websocket", b"Upgrade"
    sent_key = key
    if flaw == "no_key":
        sent_key = None
    elif flaw == "bad_key":
        sent_key = b"!!not base64!!"
    elif flaw == "short_key":
        sent_key = base64.b64encode(b"short")
    elif flaw == "version_8":
        version = b"8"
    elif flaw == "no_version":
        version = None
    elif flaw == "version_list":
        version = b"13, 8"
    elif flaw == "no_upgrade":
        upgrade = None
    elif flaw == "upgrade_h2c":
        upgrade = b"h2c"
    elif flaw == "conn_keepalive":
        connection = b"keep-alive"
    elif flaw == "post":
        method = b"POST"
    elif flaw == "http10":
        http = b"HTTP/1.0"
    elif flaw == "extensions":
        extra = [b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]
    elif flaw == "protocol":
        extra = [b"Sec-WebSocket-Protocol: chat, superchat"]
    elif flaw == "body":
        extra = [b"Content-Length: 5"]
    elif flaw == "no_query":
        target = "/ws"
    elif flaw == "dup_key":
        extra = [b"Sec-WebSocket-Key: " + draw(keys)]
    raw = upgrade_request(target, sent_key, version, extra, method, http, upgrade, connection)
    if flaw == "body":
        raw += b"hello"
    valid = flaw in (None, "extensions", "protocol", "no_query")
    must_not = flaw in ("no_key", "version_8", "no_version", "bad_key", "short_key")
    return raw, key, valid, must_not


INVALID_UTF8 = [b"\xff\xfe", b"\xed\xa0\x80", b"\xe2\x82", b"\xc0\xaf", b"a\x80b", b"\xf4\x90\x80\x80"]
OPCODES = list(range(16))


@st.composite
def hostile_frame(draw) -> bytes:
    kind = draw(st.sampled_from(["random_opcode", "rsv", "unmasked", "no_fin", "continuation", "bad_utf8",
                                 "big_control", "fragmented_control", "close", "lying_length", "huge_length",
                                 "non_minimal", "garbage", "text", "text", "binary", "ping", "feature_flags",
                                 "pong", "big_message"]))
    payload = draw(st.binary(max_size=120))
    key = draw(st.sampled_from([b"\x11\x22\x33\x44", ZERO_KEY, b"\xff\xff\xff\xff"]))
    if kind == "random_opcode":
        return frame(draw(st.sampled_from(OPCODES)), payload, fin=draw(st.booleans()), key=key)
    if kind == "rsv":
        return frame(draw(st.sampled_from([1, 2])), payload, rsv=draw(st.integers(1, 7)), key=key)
    if kind == "unmasked":
        return frame(draw(st.sampled_from([1, 2, 9])), payload, masked=False)
    if kind == "no_fin":
        return frame(draw(st.sampled_from([1, 2])), draw(st.text(max_size=60)).encode(), fin=False, key=key)
    if kind == "continuation":
        return frame(0, payload, fin=draw(st.booleans()), key=key)
    if kind == "bad_utf8":
        return frame(1, draw(st.sampled_from(INVALID_UTF8)) + payload[:10], fin=draw(st.booleans()), key=key)
    if kind == "big_control":
        return frame(draw(st.sampled_from([8, 9, 10])), b"p" * draw(st.integers(126, 400)), key=key)
    if kind == "fragmented_control":
        return frame(draw(st.sampled_from([8, 9, 10])), payload[:20], fin=False, key=key)
    if kind == "close":
        code = draw(st.sampled_from([None, 0, 999, 1000, 1001, 1004, 1005, 1006, 1015, 1016, 2999, 3000, 4999,
                                     5000, 65535]))
        if code is None:
            body = draw(st.sampled_from([b"", b"\x03"]))  # empty, or a one-byte (invalid) payload
        else:
            body = struct.pack(">H", code) + draw(st.sampled_from([b"", b"bye", b"\xff\xfe", b"r" * 123]))
        return frame(8, body, key=key)
    if kind == "lying_length":  # declares more than it sends: the server waits, then sees our EOF
        return frame(draw(st.sampled_from([1, 2])), payload, declared=len(payload) + draw(st.integers(1, 10 ** 6)),
                     key=key)
    if kind == "huge_length":
        return frame(draw(st.sampled_from([0, 1, 2])), payload,
                     declared=draw(st.sampled_from([2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1])),
                     length_form="64", key=key)
    if kind == "non_minimal":
        return frame(1, b"{}", length_form=draw(st.sampled_from(["16", "64"])), key=key)
    if kind == "garbage":
        return payload or b"\x00"
    if kind == "text":
        return frame(1, draw(st.text(max_size=80)).encode("utf-8"), key=key)
    if kind == "binary":
        return frame(2, payload, key=key)
    if kind == "ping":
        return frame(9, payload[:125], key=key)
    if kind == "pong":
        return frame(10, payload[:125], key=key)
    if kind == "feature_flags":
        data = draw(st.one_of(st.none(), st.booleans(), st.text(max_size=10),
                              st.dictionaries(st.text(max_size=20), st.one_of(st.booleans(), st.integers(),
                                                                              st.text(max_size=10)), max_size=3)))
        return frame(1, json.dumps({"type": "feature_flags", "data": data}).encode(), key=key)
    # big_message: around the 4 MB message limit, in one frame or in fragments
    size = draw(st.sampled_from([1 << 20, (4 << 20) - 16, (4 << 20) + 16, 6 << 20]))
    if draw(st.booleans()):
        return frame(2, b"b" * size, key=ZERO_KEY)
    half = size // 2
    return frame(2, b"b" * half, fin=False, key=ZERO_KEY) + frame(0, b"b" * (size - half), key=ZERO_KEY)


@st.composite
def ws_cases(draw) -> WSCase:
    raw, key, valid, must_not = draw(upgrades())
    frames = draw(st.lists(hostile_frame(), max_size=8)) if valid or draw(st.integers(0, 3)) == 0 else []
    return WSCase(raw, key, valid, must_not, frames, draw(st.booleans()),
                  draw(st.sampled_from([None] * 10 + ["close", "rst"])))


def check_server_bytes(case: WSCase, out: support.RawOutcome, tally: support.Tally, desc: str) -> None:
    """The upgrade answer must be well-formed HTTP; after a 101, the server's frames must be well-formed."""
    data = out.data
    clean = out.eof
    if not data:
        if not out.hung:
            tally.reply(None, desc)
        return
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if clean:
            tally.bad(f"truncated upgrade answer {support.show(data, 120)}", desc)
        return
    replies, problem = support.parse_replies(data[:end + 4], [False], complete=False)
    if problem or not replies:
        # not a 101: then a normal response, which parse_replies can check whole
        replies, problem = support.parse_replies(data, [False], complete=clean)
        if problem:
            tally.bad(problem, desc)
        for reply in replies:
            if reply.status >= 200:
                tally.reply(reply.status, desc, reply.body)
        return
    head = replies[0]
    if head.status != 101:
        replies, problem = support.parse_replies(data, [False], complete=clean)
        if problem:
            tally.bad(problem, desc)
        for reply in replies:
            if reply.status >= 200:
                tally.reply(reply.status, desc, reply.body)
        if case.valid_upgrade and head.status not in (503,):
            tally.bad(f"a valid upgrade was refused with {head.status}", desc)
        return
    tally.statuses[101] += 1
    if case.must_not_accept:
        tally.deviation("101 Switching Protocols for an upgrade without a valid key or version", desc)
    elif case.upgrade.count(b"Sec-WebSocket-Key:") > 1:
        tally.deviation("101 Switching Protocols for an upgrade with two Sec-WebSocket-Key headers", desc)
    elif head.header(b"sec-websocket-accept") != accept_for(case.key):
        tally.bad(f"wrong Sec-WebSocket-Accept {head.header(b'sec-websocket-accept')!r}", desc)
    problem = check_frames(data[end + 4:], clean, tally)
    if problem:
        tally.bad(problem, desc)


def check_frames(data: bytes, clean: bool, tally: support.Tally) -> str | None:
    pos, first, closed = 0, True, False
    while pos < len(data):
        if len(data) - pos < 2:
            return "truncated frame header" if clean else None
        b0, b1 = data[pos], data[pos + 1]
        fin, rsv, opcode, masked, length = b0 & 0x80, b0 & 0x70, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        pos += 2
        if length == 126:
            if len(data) - pos < 2:
                return "truncated frame length" if clean else None
            length = struct.unpack(">H", data[pos:pos + 2])[0]
            pos += 2
        elif length == 127:
            if len(data) - pos < 8:
                return "truncated frame length" if clean else None
            length = struct.unpack(">Q", data[pos:pos + 8])[0]
            pos += 8
        if masked:
            return "the server masked a frame"
        if rsv:
            return f"reserved bits set in a server frame ({b0:#x})"
        if opcode not in (0, 1, 2, 8, 9, 10):
            return f"server frame with opcode {opcode}"
        if closed:
            return "server frame after its close frame"
        if opcode >= 8 and (not fin or length > 125):
            return f"bad server control frame (opcode {opcode}, length {length}, fin {bool(fin)})"
        if len(data) - pos < length:
            return f"truncated server frame ({len(data) - pos} of {length} bytes)" if clean else None
        payload = data[pos:pos + length]
        pos += length
        if opcode == 1 and fin:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                return "server text frame with invalid UTF-8"
            if first:
                try:
                    message = json.loads(text)
                except ValueError:
                    return f"first server message is not JSON: {support.show(payload, 80)}"
                if message.get("type") != "status":
                    return f"first server message is not a status message: {support.show(payload, 80)}"
        if opcode == 8:
            closed = True
            if length == 1:
                return "server close frame with a one-byte payload"
            if length >= 2:
                code = struct.unpack(">H", payload[:2])[0]
                tally.statuses[f"ws-close-{code}"] += 1
                if code not in VALID_CLOSE_CODES:
                    return f"server close frame with code {code}"
            else:
                tally.statuses["ws-close-empty"] += 1
        first = False
    return None


@pytest.mark.slow
def test_hostile_websocket_traffic_never_breaks_the_server(fuzz_server):
    tally = support.new_tally("hostile-websocket", fuzz_server)

    def handle(case: WSCase) -> None:
        tally.sent += 1 + len(case.frames)
        frames_shown = support.show(b"|".join(f[:40] for f in case.frames), 200)
        desc = support.show(case.upgrade, 160) + " frames: " + frames_shown + \
            (f" [abort:{case.abort}]" if case.abort else "")
        frames = b"".join(case.frames)
        pieces = [case.upgrade + frames] if case.together else [case.upgrade, frames]
        pause = 0.0 if case.together else 0.003
        out = support.raw_exchange(fuzz_server.port, [p for p in pieces if p], abort=case.abort, pause_s=pause)
        tally.connections += 1
        if out.aborted:
            tally.aborted += 1
            return
        if out.hung:
            tally.hang(desc, "the connection did not end after our EOF")
        check_server_bytes(case, out, tally, desc)

    support.fuzz(tally, ws_cases(), handle, examples=EXAMPLES, time_limit_s=TIME_LIMIT_S)
    problems = tally.finish()
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_unfinished_websocket_message_does_not_grow_memory(fuzz_server):
    """One client streams a text message that never ends (one frame with a huge declared length, then
    fragments without FIN): the server must stop it (close 1009 or drop it) before its memory grows by
    RSS_GROWTH_LIMIT_MB, and stay healthy."""
    pid = fuzz_server.proc.pid
    start = support.rss_kb(pid)
    report = []
    chunk = b"x" * (1 << 20)
    for shape in ("one-huge-frame", "fragments-without-fin"):
        sock = socket.create_connection((support.HOST, fuzz_server.port), timeout=10)
        key = base64.b64encode(b"0123456789abcdef")
        sock.sendall(upgrade_request(f"/ws?clientId=flood-{shape}", key, b"13", []))
        head = b""
        while b"\r\n\r\n" not in head:
            got = sock.recv(4096)
            if not got:
                break
            head += got
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        sent, peak, stopped_by = 0, start, "all sent"
        began = time.monotonic()
        sock.settimeout(10)
        try:
            if shape == "one-huge-frame":
                sock.sendall(frame(1, b"", declared=FLOOD_MB << 20, length_form="64", key=ZERO_KEY))
            for index in range(FLOOD_MB):
                if shape == "one-huge-frame":
                    sock.sendall(chunk)
                else:
                    sock.sendall(frame(1 if index == 0 else 0, chunk, fin=False, key=ZERO_KEY))
                sent += 1
                if index % 8 == 0:
                    peak = max(peak, support.rss_kb(pid) or 0)
                if time.monotonic() - began > FLOOD_TIME_LIMIT_S:
                    stopped_by = "time limit"
                    break
        except (BrokenPipeError, ConnectionResetError):
            stopped_by = "server closed the connection"
        except socket.timeout:
            stopped_by = "server stopped reading (send timed out)"
        peak = max(peak, support.rss_kb(pid) or 0)
        rest = b""
        try:
            sock.settimeout(3)
            while len(rest) < 1 << 16:
                got = sock.recv(65536)
                if not got:
                    break
                rest += got
        except (socket.timeout, ConnectionResetError):
            pass
        sock.close()
        close_code = None
        marker = rest.find(b"\x88")
        if marker >= 0 and len(rest) >= marker + 4:
            close_code = struct.unpack(">H", rest[marker + 2:marker + 4])[0]
        report.append({"shape": shape, "sent_mb": sent, "stopped_by": stopped_by, "close_code": close_code,
                       "rss_start_mb": round(start / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
                       "seconds": round(time.monotonic() - began, 1)})
    post = support.after_category_checks(fuzz_server)
    print(f"\n== unfinished websocket message: {json.dumps(report)}; after: {post}")
    support.SUMMARY.append({"category": "websocket-unfinished-message", "seed": None, "requests_sent": 0, "quota": 0,
                            "seconds": sum(r["seconds"] for r in report), "server_500": 0, "malformed_responses": 0,
                            "hangs": 0, "health_probes": {}, "status_histogram": {},
                            "rss_mb": {"baseline": round(start / 1024, 1),
                                       "peak": max(r["rss_peak_mb"] for r in report),
                                       "after": round((post.get("rss_kb") or 0) / 1024, 1)},
                            "after": {k: v for k, v in post.items() if k != "rss_kb"}, "flood": report})
    problems = [f"{r['shape']}: RSS grew from {r['rss_start_mb']} to {r['rss_peak_mb']} MB while "
                f"{r['sent_mb']} MB of one unfinished message were accepted ({r['stopped_by']})"
                for r in report if r["rss_peak_mb"] - r["rss_start_mb"] > support.RSS_GROWTH_LIMIT_MB]
    if post.get("health_status") != 200:
        problems.append(f"/health after the flood: {post.get('health_status')}")
    if post.get("prompt_status") != "success":
        problems.append(f"a valid prompt after the flood: {post.get('prompt_status')} {post.get('prompt_detail', '')}")
    assert not problems, "\n".join(problems)
