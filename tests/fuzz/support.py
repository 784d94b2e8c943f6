"""Machinery shared by the fuzz tests: raw-socket HTTP clients, response checks, tallies and health checks.

Every category follows the same plan: hypothesis generates cases, each case sends one or more requests over
raw sockets (so that nothing between the generator and the server fixes the bytes up), every answer is
checked (a well-formed HTTP response, or the connection closed; never a 500; never a hang), `/health` is
probed on a fresh connection every so often, and after the category the server must still be healthy:
`/health` answers 200 in time, a valid prompt runs to "success", the process is alive and its RSS stayed
under a bound. Problems are collected, not raised one at a time, so one run reports all of them.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import hypothesis
import requests
from hypothesis import HealthCheck, Phase

HOST = "127.0.0.1"
IO_TIMEOUT_S = 5.0  # an answer (or a close) must come within this; otherwise the request hung the connection
HEALTH_DEADLINE_S = 1.0  # a platform's liveness probe timeout
PROMPT_DEADLINE_S = 30.0  # a valid prompt queued after a category must finish in this
RSS_GROWTH_LIMIT_MB = 150
MAX_HANGS = 3  # a category stops early after this many hung requests (the server is presumably wedged)
MAX_EXAMPLES_KEPT = 25  # examples of each kind of failure kept for the report
SUMMARY: list[dict] = []  # one entry per category, written out by conftest.py
# Generated requests each category must send per run (test_fuzz_*.py); together at least 10,000.
QUOTAS = {"malformed-http": 5000, "hostile-json": 7000, "odd-paths": 5000, "hostile-websocket": 3500}
MIN_REQUESTS_PER_RUN = 10_000
assert sum(QUOTAS.values()) >= MIN_REQUESTS_PER_RUN


def valid_prompt(value: float = 3.0) -> dict:
    return {"1": {"class_type": "Number", "inputs": {"value": value}},
            "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}


def fuzz_seed() -> int:
    """FUZZ_SEED=<n> replays a run; otherwise a fresh seed, printed with the results."""
    env = os.environ.get("FUZZ_SEED")
    return int(env) if env else random.SystemRandom().randrange(2 ** 31)


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def show(data: bytes | str, limit: int = 300) -> str:
    """A short printable form of a request or response for the report: its start and its end."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return repr(data)
    tail = limit // 3
    return f"{data[:limit - tail]!r} ...({len(data)} bytes)... {data[-tail:]!r}"


# -- HTTP responses --------------------------------------------------------------------------------------
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class BadResponse(Exception):
    pass


@dataclass
class Reply:
    status: int
    headers: list  # (lower-case name, value) bytes pairs
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


def _parse_head(buf: bytes):
    """(status, headers, head length) for a complete head at the start of buf, None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 1 << 20:
            raise BadResponse(f"no end of response head in {len(buf)} bytes")
        if not b"HTTP/1.".startswith(buf[:7]):
            raise BadResponse(f"not an HTTP response: {show(buf, 80)}")
        return None
    lines = buf[:end].split(b"\r\n")
    match = STATUS_LINE.fullmatch(lines[0])
    if not match:
        raise BadResponse(f"bad status line {show(lines[0], 80)}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name) or b"\x00" in value or b"\r" in value or b"\n" in value:
            raise BadResponse(f"bad header line {show(line, 80)}")
        headers.append((name.lower(), value.strip(b" \t")))
    return int(match.group(1)), headers, end + 4


def _body_length(status: int, headers: list, head_request: bool) -> int | None:
    """Bytes of body after the head; None: delimited by the end of the connection."""
    if head_request or 100 <= status < 200 or status in (204, 304):
        return 0
    lengths = {value for name, value in headers if name == b"content-length"}
    if len(lengths) > 1:
        raise BadResponse(f"conflicting Content-Length headers {sorted(lengths)}")
    if lengths:
        value = lengths.pop()
        if not value.isdigit():
            raise BadResponse(f"bad Content-Length {show(value, 40)}")
        return int(value)
    if any(name == b"transfer-encoding" for name, _ in headers):
        raise BadResponse("chunked responses are not expected from this server")
    return None


def parse_replies(data: bytes, head_flags: list[bool], complete: bool) -> tuple[list[Reply], str | None]:
    """Splits what a connection received into responses. `head_flags[i]`: request i was HEAD (no body in
    its response). `complete`: the connection ended cleanly, so a partial response is a problem."""
    replies: list[Reply] = []
    pos = 0
    try:
        while pos < len(data):
            parsed = _parse_head(data[pos:])
            if parsed is None:
                return replies, "truncated response head" if complete else None
            status, headers, head_len = parsed
            final_index = sum(1 for r in replies if r.status >= 200)
            is_head = status >= 200 and final_index < len(head_flags) and head_flags[final_index]
            length = _body_length(status, headers, is_head)
            start = pos + head_len
            if length is None:
                body, pos = data[start:], len(data)
            else:
                if len(data) - start < length:
                    return replies, f"truncated body ({len(data) - start} of {length} bytes)" if complete else None
                body, pos = data[start:start + length], start + length
            if is_head and pos < len(data) and not data[pos:].startswith(b"HTTP/"):
                # Which request a response answers is a guess when a request smuggled another one in, and
                # an error answer to an unparsable HEAD request may carry a body: if the bytes that follow
                # are exactly the declared body (then the end or the next response), take them as the body.
                declared = _body_length(status, headers, False) or 0
                rest = data[pos + declared:]
                if declared and (not rest.strip() or rest.startswith(b"HTTP/")):
                    body, pos = data[pos:pos + declared], pos + declared
            replies.append(Reply(status, headers, body))
    except BadResponse as exc:
        return replies, str(exc)
    return replies, None


# -- raw connections ---------------------------------------------------------------------------------------
@dataclass
class RawOutcome:
    data: bytes = b""
    eof: bool = False  # the server closed its side cleanly
    reset: bool = False  # the connection was reset (acceptable: the server dropped it)
    hung: bool = False  # neither an answer to the end nor a close within the timeout
    send_failed: bool = False  # the server closed while we were still sending
    aborted: bool = False  # we dropped the connection ourselves (abrupt-close cases)
    elapsed_s: float = 0.0


def raw_exchange(port: int, pieces: list[bytes], *, abort: str | None = None, pause_s: float = 0.0,
                 timeout: float = IO_TIMEOUT_S) -> RawOutcome:
    """Sends the pieces on a new connection, then (unless aborting) half-closes and reads to the end."""
    out = RawOutcome()
    started = time.monotonic()
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                out.send_failed = True
                break
            except socket.timeout:  # the server stopped reading without answering or closing
                out.send_failed = True
                break
            if pause_s:
                time.sleep(pause_s)
        if abort is not None:
            if abort == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            out.aborted = True
            return out
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        received = bytearray()
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.hung = True
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                out.hung = True
                break
            except ConnectionResetError:
                out.reset = True
                break
            if not chunk:
                out.eof = True
                break
            received += chunk
        out.data = bytes(received)
        return out
    finally:
        sock.close()
        out.elapsed_s = time.monotonic() - started


@dataclass
class KAResult:
    reply: Reply | None = None
    closed: bool = False  # the server closed (or reset) the connection instead of answering
    hung: bool = False
    problem: str | None = None  # a malformed response
    elapsed_s: float = 0.0


class KeepAlive:
    """One persistent connection; sends raw requests, reads exactly one response each."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT_S):
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.connections = 0
        self._got_bytes = False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buffer = b""

    def build(self, method: str, target: str, body: bytes | None = None, headers=()) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + (body or b"")

    def request(self, method: str, target: str, body: bytes | None = None, headers=()) -> KAResult:
        raw = self.build(method, target, body, headers)
        started = time.monotonic()
        for attempt in range(2):
            fresh = self.sock is None
            if fresh:
                self.sock = socket.create_connection((HOST, self.port), timeout=self.timeout)
                self.connections += 1
            result = self._exchange(raw, method == "HEAD")
            # a reused connection the server had already closed: retry once on a new one
            if result.closed and not fresh and attempt == 0 and result.reply is None and not self._got_bytes:
                self.close()
                continue
            break
        result.elapsed_s = time.monotonic() - started
        return result

    def _exchange(self, raw: bytes, head_request: bool) -> KAResult:
        self._got_bytes = False
        try:
            self.sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may still have answered before closing: read it
        except socket.timeout:
            self.close()
            return KAResult(hung=True)
        deadline = time.monotonic() + self.timeout
        data = self.buffer
        self.buffer = b""
        while True:
            try:
                parsed = _parse_head(data)
                if parsed is not None:
                    status, headers, head_len = parsed
                    if 100 <= status < 200:  # 100 Continue and friends: skip
                        data = data[head_len:]
                        continue
                    length = _body_length(status, headers, head_request)
                    if length is not None and len(data) - head_len >= length:
                        reply = Reply(status, headers, data[head_len:head_len + length])
                        self.buffer = data[head_len + length:]
                        if (reply.header(b"connection") or b"").lower() == b"close":
                            self.close()
                        return KAResult(reply=reply)
            except BadResponse as exc:
                self.close()
                return KAResult(problem=str(exc))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                return KAResult(hung=True)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                self.close()
                return KAResult(hung=True)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.close()
                if data:
                    try:  # a close-delimited body is complete now
                        parsed = _parse_head(data)
                        if parsed is not None:
                            status, headers, head_len = parsed
                            if _body_length(status, headers, head_request) is None:
                                return KAResult(reply=Reply(status, headers, data[head_len:]))
                    except BadResponse as exc:
                        return KAResult(problem=str(exc))
                    return KAResult(closed=True, problem=f"connection closed mid-response: {show(data, 120)}")
                return KAResult(closed=True)
            self._got_bytes = True
            data += chunk


def probe_health(port: int, timeout: float = IO_TIMEOUT_S) -> tuple[int | None, float]:
    """GET /health on a fresh connection, as a platform probe does: (status or None, seconds)."""
    started = time.monotonic()
    try:
        client = KeepAlive(port, timeout)
        result = client.request("GET", "/health")
        client.close()
    except OSError:
        return None, time.monotonic() - started
    return (result.reply.status if result.reply else None), time.monotonic() - started


# -- tallies ---------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What one category sent and what came back."""

    category: str
    srv: object
    seed: int = 0
    quota: int = 0
    sent: int = 0  # generated requests (HTTP requests, WebSocket upgrades and frames) sent
    examples: int = 0
    connections: int = 0
    statuses: Counter = field(default_factory=Counter)
    closed_without_answer: int = 0
    closed_examples: list = field(default_factory=list)
    aborted: int = 0
    server_500: list = field(default_factory=list)
    server_500_count: int = 0
    bad_responses: list = field(default_factory=list)
    bad_response_count: int = 0
    problem_kinds: Counter = field(default_factory=Counter)  # malformed responses and deviations, by kind
    deviations: list = field(default_factory=list)  # protocol deviations that break none of the invariants
    deviation_count: int = 0
    hangs: list = field(default_factory=list)
    connect_errors: list = field(default_factory=list)
    health: list = field(default_factory=list)  # (status, seconds) of the probes during the category
    stop_reason: str | None = None
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0
    rss_start_kb: int | None = None
    rss_peak_kb: int | None = None
    post: dict = field(default_factory=dict)
    log_errors: dict = field(default_factory=dict)

    def __post_init__(self):
        self.rss_start_kb = rss_kb(self.srv.proc.pid)
        self.rss_peak_kb = self.rss_start_kb
        self.log_offset = self.srv.log_path.stat().st_size

    # recording
    def reply(self, status: int | None, request: str, response: bytes = b"") -> None:
        if status is None:
            self.closed_without_answer += 1
            self.statuses["closed"] += 1
            if len(self.closed_examples) < 10:
                self.closed_examples.append(request)
            return
        self.statuses[status] += 1
        if status == 500:
            self.server_500_count += 1
            if len(self.server_500) < MAX_EXAMPLES_KEPT:
                self.server_500.append({"request": request, "status": status, "response": show(response, 200)})

    def bad(self, problem: str, request: str) -> None:
        self.bad_response_count += 1
        self.statuses["malformed"] += 1
        self.problem_kinds[_kind(problem)] += 1
        if len(self.bad_responses) < MAX_EXAMPLES_KEPT:
            self.bad_responses.append({"problem": problem, "request": request})

    def deviation(self, problem: str, request: str) -> None:
        """Reported, not failed: the answer is well-formed and the server unharmed, but a stricter peer
        would have refused the request (e.g. a WebSocket key that is not 16 base64-encoded bytes)."""
        self.deviation_count += 1
        self.problem_kinds["deviation: " + _kind(problem)] += 1
        if len(self.deviations) < MAX_EXAMPLES_KEPT:
            self.deviations.append({"problem": problem, "request": request})

    def hang(self, request: str, what: str = "no answer and no close") -> None:
        self.statuses["hung"] += 1
        self.hangs.append({"problem": f"{what} within {IO_TIMEOUT_S} s", "request": request})
        if len(self.hangs) >= MAX_HANGS and self.stop_reason is None:
            self.stop_reason = f"stopped early after {len(self.hangs)} hung requests"

    def raw_outcome(self, out: RawOutcome, head_flags: list[bool], desc: str) -> None:
        """Checks a raw exchange; head_flags[i]: the i-th request sent was a HEAD request."""
        self.connections += 1
        if out.aborted:
            self.aborted += 1
            return
        if out.hung:
            self.hang(desc)
        replies, problem = parse_replies(out.data, head_flags, complete=out.eof)
        if problem:
            self.bad(problem, desc)
        if not replies and not out.hung:
            self.reply(None, desc)
        for reply in replies:
            if reply.status >= 200:
                self.reply(reply.status, desc, reply.body)

    def keepalive_result(self, result: KAResult, desc: str) -> Reply | None:
        if result.hung:
            self.hang(desc)
            return None
        if result.problem:
            self.bad(result.problem, desc)
        if result.reply is None:
            if not result.problem:
                self.reply(None, desc)
            return None
        self.reply(result.reply.status, desc, result.reply.body)
        return result.reply

    def connect_error(self, exc: OSError) -> None:
        self.statuses["connect-error"] += 1
        if len(self.connect_errors) < MAX_EXAMPLES_KEPT:
            self.connect_errors.append(repr(exc))
        if self.srv.proc.poll() is not None and self.stop_reason is None:
            self.stop_reason = f"server process exited with status {self.srv.proc.returncode}"
        elif len(self.connect_errors) >= MAX_HANGS and self.stop_reason is None:
            self.stop_reason = f"stopped early after {len(self.connect_errors)} connection errors"

    def probe(self) -> None:
        status, seconds = probe_health(self.srv.port)
        self.health.append((status, seconds))
        rss = rss_kb(self.srv.proc.pid)
        if rss is not None:
            self.rss_peak_kb = max(self.rss_peak_kb or 0, rss)
        if self.srv.proc.poll() is not None and self.stop_reason is None:
            self.stop_reason = f"server process exited with status {self.srv.proc.returncode}"

    # the end of a category
    def finish(self) -> list[str]:
        """Runs the after-category checks, records the summary, returns the problems found."""
        self.elapsed_s = time.monotonic() - self.started
        self.post = after_category_checks(self.srv)
        self.log_errors = server_log_errors(self.srv.log_path, self.log_offset)
        if self.post.get("rss_kb"):
            self.rss_peak_kb = max(self.rss_peak_kb or 0, self.post["rss_kb"])
        summary = self.summary()
        SUMMARY.append(summary)
        print(f"\n== fuzz category {self.category}: {json.dumps(summary, indent=1, default=str)}")
        return self.problems()

    def health_stats(self) -> dict:
        latencies = sorted(s for _, s in self.health)
        if not latencies:
            return {"probes": 0}
        return {"probes": len(latencies), "failed": sum(1 for st, s in self.health
                                                        if st != 200 or s > HEALTH_DEADLINE_S),
                "p50_ms": round(1000 * latencies[len(latencies) // 2], 1), "max_ms": round(1000 * latencies[-1], 1)}

    def summary(self) -> dict:
        baseline = getattr(self.srv, "rss_baseline_kb", None)
        return {
            "category": self.category, "seed": self.seed, "requests_sent": self.sent, "quota": self.quota,
            "examples": self.examples, "connections": self.connections, "seconds": round(self.elapsed_s, 1),
            "status_histogram": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
            "closed_without_answer": self.closed_without_answer, "aborted_by_client": self.aborted,
            "server_500": self.server_500_count, "malformed_responses": self.bad_response_count,
            "hangs": len(self.hangs), "connect_errors": self.connect_errors[:5],
            "protocol_deviations (not failures)": self.deviation_count, "problem_kinds": dict(self.problem_kinds),
            "health_probes": self.health_stats(), "stop_reason": self.stop_reason,
            "rss_mb": {"baseline": _mb(baseline), "category_start": _mb(self.rss_start_kb),
                       "peak": _mb(self.rss_peak_kb), "after": _mb(self.post.get("rss_kb"))},
            "after": {k: v for k, v in self.post.items() if k != "rss_kb"},
            "server_log_errors (reported, not failed)": self.log_errors,
            "first_500s": self.server_500[:10], "first_malformed": self.bad_responses[:10],
            "hung_requests": self.hangs[:10], "closed_without_answer_examples": self.closed_examples[:5],
            "first_deviations": self.deviations[:5],
        }

    def problems(self) -> list[str]:
        out = []
        if self.sent < self.quota:
            why = self.stop_reason or "the generator ran out of examples"
            out.append(f"only {self.sent} of {self.quota} requests were sent ({why})")
        if self.server_500_count:
            out.append(f"{self.server_500_count} responses were 500; first ones:\n  " +
                       "\n  ".join(f"{e['request']} -> {e['status']} {e['response']}" for e in self.server_500[:8]))
        if self.bad_response_count:
            out.append(f"{self.bad_response_count} malformed responses; first ones:\n  " +
                       "\n  ".join(f"{e['problem']}: {e['request']}" for e in self.bad_responses[:8]))
        if self.connect_errors:
            out.append(f"{self.statuses['connect-error']} requests failed with a socket error (connection refused, "
                       f"reset while connecting...): {self.connect_errors[:3]}")
        if self.hangs:
            out.append(f"{len(self.hangs)} requests hung the connection:\n  " +
                       "\n  ".join(e["request"] for e in self.hangs[:5]))
        late = [(st, s) for st, s in self.health if st != 200 or s > HEALTH_DEADLINE_S]
        if late:
            out.append(f"{len(late)} of {len(self.health)} /health probes during the category failed or took over "
                       f"{HEALTH_DEADLINE_S} s: {late[:5]}")
        post = self.post
        if not post.get("alive"):
            out.append(f"the server process is gone (exit status {post.get('exit_status')})")
        if post.get("health_status") != 200 or (post.get("health_ms") or 1e9) > HEALTH_DEADLINE_S * 1000:
            out.append(f"/health after the category: status {post.get('health_status')} in {post.get('health_ms')} ms")
        if post.get("prompt_status") != "success":
            out.append(f"a valid prompt queued after the category did not succeed within {PROMPT_DEADLINE_S} s: "
                       f"{post.get('prompt_status')} {post.get('prompt_detail', '')}")
        baseline = getattr(self.srv, "rss_baseline_kb", None)
        if baseline and self.rss_peak_kb and self.rss_peak_kb - baseline > RSS_GROWTH_LIMIT_MB * 1024:
            out.append(f"RSS grew from {_mb(baseline)} MB to {_mb(self.rss_peak_kb)} MB "
                       f"(limit +{RSS_GROWTH_LIMIT_MB} MB)")
        return out


def _kind(problem: str) -> str:
    return re.sub(r"\d+", "N", re.split(r"[:(]", problem, maxsplit=1)[0]).strip()


def _mb(kb) -> float | None:
    return round(kb / 1024, 1) if kb else None


LOG_ERROR = re.compile(r" ERROR (comfy_serverless\.server[\w.]*): (.*)")


def server_log_errors(log_path, offset: int) -> dict:
    """ERROR lines of the server's HTTP/WebSocket layer written since `offset`, by kind, each with the
    last line of its traceback. Node failures (the Fail node) are the engine's and are not counted."""
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode("utf-8", "replace").splitlines()
    kinds: Counter = Counter()
    for index, line in enumerate(lines):
        match = LOG_ERROR.search(line)
        if not match:
            continue
        cause = ""
        for following in lines[index + 1:index + 80]:
            if re.match(r"\d{4}-\d\d-\d\d ", following):
                break
            if following and not following.startswith((" ", "Traceback", "During handling", "The above")):
                cause = following.strip()
        message = re.sub(r"/\S*", "<target>", match.group(2))[:80]
        kinds[f"{match.group(1)}: {message} -> {cause[:120]}"] += 1
    return dict(kinds)


def after_category_checks(srv) -> dict:
    """Is the server still whole? Alive, /health in time, a valid prompt runs, RSS."""
    result: dict = {"alive": srv.proc.poll() is None, "exit_status": srv.proc.poll()}
    status, seconds = probe_health(srv.port)
    result["health_status"], result["health_ms"] = status, round(seconds * 1000, 1)
    try:
        session = requests.Session()
        marker = float(random.randint(-999, 999))
        response = session.post(srv.url + "/prompt", data=json.dumps({"prompt": valid_prompt(marker)}), timeout=10)
        if response.status_code != 200:
            result["prompt_status"] = f"POST /prompt answered {response.status_code}"
            result["prompt_detail"] = response.text[:300]
        else:
            prompt_id = response.json()["prompt_id"]
            started = time.monotonic()
            deadline = started + PROMPT_DEADLINE_S
            entry = None
            while time.monotonic() < deadline:
                found = session.get(f"{srv.url}/history/{prompt_id}", timeout=10).json()
                if prompt_id in found:
                    entry = found[prompt_id]
                    break
                time.sleep(0.05)
            if entry is None:
                queue = session.get(srv.url + "/queue", timeout=10).json()
                result["prompt_status"] = "not in /history"
                result["prompt_detail"] = (f"running={len(queue['queue_running'])} "
                                           f"pending={len(queue['queue_pending'])}")
            else:
                result["prompt_status"] = entry["status"]["status_str"]
                result["prompt_seconds"] = round(time.monotonic() - started, 2)
                if entry["status"]["status_str"] != "success":
                    result["prompt_detail"] = json.dumps(entry["status"])[:500]
        session.close()
    except (requests.RequestException, ValueError, KeyError) as exc:
        result["prompt_status"] = f"request failed: {exc!r}"
    result["rss_kb"] = rss_kb(srv.proc.pid)
    return result


# -- the generator loop ---------------------------------------------------------------------------------
def fuzz(tally: Tally, strategy, handle, *, examples: int, time_limit_s: float, probe_every: int = 100,
         max_rounds: int = 4) -> None:
    """Feeds hypothesis-generated cases to `handle` until the quota of requests is sent (more rounds with
    the next seeds if one round falls short), the time limit passes, or the server looks wedged."""
    deadline = time.monotonic() + time_limit_s
    for round_no in range(max_rounds):
        if tally.sent >= tally.quota or tally.stop_reason:
            break

        @hypothesis.seed(tally.seed + round_no)
        @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                             phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                             print_blob=False)
        @hypothesis.given(strategy)
        def one(case):
            if tally.stop_reason or tally.sent >= tally.quota:
                return
            if time.monotonic() > deadline:
                tally.stop_reason = f"time limit of {time_limit_s} s reached"
                return
            try:
                handle(case)
            except OSError as exc:  # could not even connect (or a socket error outside the checked paths)
                tally.connect_error(exc)
            tally.examples += 1
            if tally.examples % probe_every == 0:
                tally.probe()

        one()
    tally.probe()


def new_tally(category: str, srv) -> Tally:
    tally = Tally(category, srv, seed=fuzz_seed(), quota=QUOTAS[category])
    print(f"\n== fuzz category {category}: seed {tally.seed} (replay with FUZZ_SEED={tally.seed})")
    return tally

