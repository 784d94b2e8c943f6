"""Malformed HTTP/1.1 on raw sockets: request lines, methods, targets, versions, headers, framing, bodies,
pipelining and abrupt closes. Each answer must be a well-formed HTTP response (or the connection closes),
never a 500, never a hang; afterwards the server must still be whole (support.Tally.finish)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import strategies as st

from . import support

EXAMPLES = 3600  # hypothesis examples per round; each sends 1-3 requests
TIME_LIMIT_S = 60

KNOWN_TARGETS = [b"/health", b"/ready", b"/", b"/system_stats", b"/queue", b"/prompt", b"/interrupt",
                 b"/history?max_items=1", b"/object_info/Number", b"/features", b"/ws", b"/metrics",
                 b"/view?filename=fuzz.png&type=input", b"/models", b"/nope", b"/api/queue", b"/api/prompt",
                 b"/free", b"/upload/image", b"*"]
JSON_BODIES = [b"{}", b'{"prompt_id": "nope"}', json.dumps({"prompt": support.valid_prompt(4.0)}).encode(),
               b'{"prompt": {}}', b'{"clear": false}', b"[]", b"null"]
TRAVERSALS = [b"/../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd", b"/view?filename=../../../etc/passwd",
              b"/view?filename=x&subfolder=../../..", b"/internal/files/..%2f..%2f", b"//health", b"/./health",
              b"/health/../ready", b"/%2fetc%2fpasswd", b"/..;/health", b"/\\..\\..\\windows\\win.ini"]
INJECTIONS = [b"\r\nX-Injected: 1", b"\x00", b"%00", b"\r\n\r\nGET /health HTTP/1.1\r\n", b"\n", b" HTTP/1.1",
              b"\t", b"\x7f", b"\xff\xfe", b"#frag", b"?a=1&a=2&=&&", b"%", b"%zz", b"%c0%ae%c0%ae/"]
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
           b"get", b"GeT", b"G ET", b"", b"POST\x00", b"\xffGET", b"GET\t", b"M" * 300]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/2", b"http/1.1",
            b"HTTP/1.1 ", b"HTTP/1.1x", b"HTTP/11", b"", b"HTTP/1.1\x00", b"HTTP/1.01", b"HTTP/9.9", b"HTTP"]
HEADER_NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect",
                b"Content-Type", b"Origin", b"Accept-Encoding", b"Range", b"If-None-Match", b"Sec-WebSocket-Key",
                b"Sec-WebSocket-Version", b"comfy-user", b"Cookie", b"X-Forwarded-For"]
HEADER_VALUES = [b"", b"0", b"-1", b"chunked", b"close", b"keep-alive", b"upgrade", b"websocket", b"h2c",
                 b"100-continue", b"gzip", b"http://evil.example", b"http://127.0.0.1:1", b"bytes=0-1",
                 b"bytes=99999999-", b"application/json", b"multipart/form-data; boundary=x", b"\xff\xfe",
                 b"a\x00b", b" lead", b"trail ", b"\t"]
FRAMINGS = ["cl_declares_more", "cl_declares_less", "dup_cl_same", "dup_cl_diff", "cl_bad", "chunked_bad",
            "cl_and_te", "te_unknown", "te_chunked_not_last"]  # the hostile ones; sane: none, cl_exact, chunked
BAD_LENGTHS = [b"abc", b"-5", b"+5", b" 5", b"5 5", b"0x10", b"99999999999999999999999", b"1e3", b"", b"5,5",
               b"\xff", b"18446744073709551616"]
BAD_CHUNKS = [b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffffff\r\nabc\r\n",
              b"3\r\nabcdef\r\n0\r\n\r\n", b"3\r\nab", b"3;ext=1\r\nabc\r\n0\r\n\r\n", b"3\nabc\n0\n\n",
              b"0\r\nX-Trailer: 1\r\n\r\n", b"3\r\nabc\r\n", b"1 1\r\na\r\n0\r\n\r\n", b"\r\n\r\n",
              b"10000000\r\n" + b"a" * 100]


@dataclass
class OneRequest:
    raw: bytes
    method: str
    target: str
    body: bytes  # the body a correct parser delivers
    smuggled: int = 0  # complete requests hidden after a body shorter than its bytes (each gets a response)


@dataclass
class RawCase:
    requests: list
    cuts: list
    abort: str | None
    pause_s: float

    @property
    def data(self) -> bytes:
        return b"".join(r.raw for r in self.requests)

    def pieces(self) -> list[bytes]:
        data = self.data
        points = sorted({min(c, len(data)) for c in self.cuts})
        out, last = [], 0
        for point in points:
            out.append(data[last:point])
            last = point
        out.append(data[last:])
        if self.abort is not None:  # an abrupt close part-way through
            out = out[:max(1, len(out) - 1)]
        return [p for p in out if p]


def percent_encoded(raw: bytes) -> bytes:
    return b"".join(b"%%%02X" % b for b in raw)


targets = st.one_of(
    st.sampled_from(KNOWN_TARGETS),
    st.sampled_from(TRAVERSALS),
    st.builds(lambda t, i: t + i, st.sampled_from(KNOWN_TARGETS), st.sampled_from(INJECTIONS)),
    st.builds(lambda n: b"/" + b"a" * n, st.sampled_from([1000, 8000, 20000, 70000, 200000])),
    st.builds(lambda raw: b"/" + percent_encoded(raw), st.binary(max_size=60)),
    st.builds(lambda raw: b"/view?filename=" + percent_encoded(raw), st.binary(max_size=40)),
    st.sampled_from([b"http://127.0.0.1/health", b"http://evil.example/health", b"https://x:99999/", b"",
                     b"health", b"//", b"/?", b"/health?" + b"&" * 500]),
    st.binary(min_size=1, max_size=80),
)
methods = st.one_of(st.sampled_from(METHODS), st.binary(min_size=1, max_size=12))
header_names = st.one_of(st.sampled_from(HEADER_NAMES), st.from_regex(rb"\A[A-Za-z0-9-]{1,20}\Z"),
                         st.binary(min_size=1, max_size=12))
header_values = st.one_of(
    st.sampled_from(HEADER_VALUES), st.binary(max_size=40),
    st.builds(lambda n: b"v" * n, st.sampled_from([5000, 20000, 70000, 120000])),
    st.builds(lambda v, junk: v + junk, st.sampled_from(HEADER_VALUES), st.sampled_from([b"\r\n", b"\n", b"\r",
                                                                                          b"\r\n "])),
)


ASPECTS = ["method", "target", "version", "line_end", "host", "headers", "special", "framing"]
SANE_METHODS = [b"GET", b"GET", b"POST", b"POST", b"HEAD", b"OPTIONS", b"DELETE", b"PUT"]


@st.composite
def one_request(draw) -> OneRequest:
    """A request with a few of its aspects made hostile (each aspect left alone is sane), so that both the
    parser's error paths and the routes behind a successful parse are reached."""
    hostile = draw(st.sets(st.sampled_from(ASPECTS), max_size=3))
    method = draw(methods) if "method" in hostile else draw(st.sampled_from(SANE_METHODS))
    target = draw(targets) if "target" in hostile else draw(st.sampled_from(KNOWN_TARGETS[:-1]))
    version = draw(st.sampled_from(VERSIONS)) if "version" in hostile else b"HTTP/1.1"
    line_end = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b" \r\n", b"\n\r"])) if "line_end" in hostile \
        else b"\r\n"
    lines = [method + b" " + target + (b" " + version if version else b"")]
    if "host" not in hostile:
        lines.append(b"Host: 127.0.0.1")
    elif draw(st.booleans()):
        lines.append(b"Host: " + draw(st.sampled_from([b"127.0.0.1:1", b"localhost", b"", b"a b", b"[::1]:x",
                                                      b"evil.example", b"127.0.0.1\x00"])))
    if "headers" in hostile:
        for name, value in draw(st.lists(st.tuples(header_names, header_values), min_size=1, max_size=4)):
            lines.append(name + b": " + value)
    special = draw(st.sampled_from(["obs_fold", "many", "no_colon", "space_name", "empty_name", "expect",
                                    "huge_count", "dup_host"])) if "special" in hostile else "none"
    if special == "obs_fold":
        lines += [b"X-Folded: first", b"  continued", b"\tagain"]
    elif special == "many":
        lines += [b"X-H%d: v" % i for i in range(draw(st.sampled_from([99, 101, 150, 1000])))]
    elif special == "huge_count":
        lines += [b"X-Same: v"] * 3000
    elif special == "no_colon":
        lines.append(b"NoColonHere")
    elif special == "space_name":
        lines.append(b"Bad Name: v")
    elif special == "empty_name":
        lines.append(b": v")
    elif special == "expect":
        lines.append(b"Expect: 100-continue")
    elif special == "dup_host":
        lines.append(b"Host: other.example")

    is_json_route = any(target.startswith(p) for p in (b"/prompt", b"/api/prompt", b"/interrupt", b"/free",
                                                       b"/queue", b"/history"))
    if is_json_route and method == b"POST":
        body = draw(st.sampled_from(JSON_BODIES))
    else:
        body = draw(st.one_of(st.binary(max_size=200), st.sampled_from(JSON_BODIES),
                              st.builds(lambda n: b"b" * n, st.sampled_from([10000, 300000]))))
    framing = draw(st.sampled_from(FRAMINGS)) if "framing" in hostile else \
        draw(st.sampled_from(["none", "cl_exact", "chunked"]))
    delivered = body
    payload = b""
    smuggled = 0
    if framing == "none":
        delivered = b""
    elif framing == "cl_exact":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "cl_declares_more":  # the body is shorter than declared
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 100000))))
        payload = body
    elif framing == "cl_declares_less":  # extra bytes after the declared body: a smuggled next "request"
        extra = draw(st.sampled_from([b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"garbage", b"\r\n\r\n",
                                      b"POST /prompt HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"]))
        smuggled = 1 if extra.endswith((b"\r\n\r\n", b"{}")) and len(extra) > 4 else 0
        lines.append(b"Content-Length: %d" % len(body))
        payload = body + extra
    elif framing == "dup_cl_same":
        lines += [b"Content-Length: %d" % len(body)] * 2
        payload = body
    elif framing == "dup_cl_diff":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
        payload = body
        delivered = b""
    elif framing == "cl_bad":
        lines.append(b"Content-Length: " + draw(st.sampled_from(BAD_LENGTHS)))
        payload = body
        delivered = b""
    elif framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 64), max_size=4))
        chunks, pos = [], 0
        for size in sizes:
            part = body[pos:pos + size]
            if not part:
                break
            chunks.append(b"%x\r\n%s\r\n" % (len(part), part))
            pos += size
        rest = body[pos:]
        if rest:
            chunks.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"".join(chunks) + b"0\r\n\r\n"
    elif framing == "chunked_bad":
        lines.append(b"Transfer-Encoding: chunked")
        payload = draw(st.sampled_from(BAD_CHUNKS))
        delivered = b""
    elif framing == "cl_and_te":
        lines += [b"Content-Length: %d" % draw(st.integers(0, 50)), b"Transfer-Encoding: chunked"]
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        delivered = b""
    elif framing == "te_unknown":
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"gzip", b"identity", b"xchunked",
                                                                    b"chunked, chunked", b"\x00chunked"])))
        payload = body
        delivered = b""
    elif framing == "te_chunked_not_last":
        lines.append(b"Transfer-Encoding: chunked, gzip")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        delivered = b""
    raw = line_end.join(lines) + line_end + line_end + payload
    return OneRequest(raw, method.decode("latin-1"), target.decode("latin-1"), delivered, smuggled)


cases = st.builds(
    RawCase,
    requests=st.lists(one_request(), min_size=1, max_size=3).map(lambda rs: rs if len(rs) == 1 or
                                                                  all(len(r.raw) < 400000 for r in rs) else rs[:1]),
    cuts=st.lists(st.integers(0, 400), max_size=3),
    abort=st.sampled_from([None] * 12 + ["close", "rst"]),
    pause_s=st.sampled_from([0.0] * 9 + [0.002]),
)


@pytest.mark.slow
def test_malformed_http_never_breaks_the_server(fuzz_server):
    tally = support.new_tally("malformed-http", fuzz_server)

    def handle(case: RawCase) -> None:
        head_flags = [flag for r in case.requests for flag in [r.method == "HEAD"] + [False] * r.smuggled]
        desc = support.show(case.data) + (f" [abort:{case.abort}]" if case.abort else "")
        tally.sent += len(case.requests)
        out = support.raw_exchange(fuzz_server.port, case.pieces(), abort=case.abort, pause_s=case.pause_s)
        tally.raw_outcome(out, head_flags, desc)

    support.fuzz(tally, cases, handle, examples=EXAMPLES, time_limit_s=TIME_LIMIT_S)
    problems = tally.finish()
    assert not problems, "\n".join(problems)
