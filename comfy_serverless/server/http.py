"""A small HTTP/1.1 server on asyncio streams, h11 (parsing) and wsproto (WebSocket framing, in websocket.py).

Why not aiohttp, which ComfyUI uses: measured on this project's 2-core machine with precompiled bytecode,
`import aiohttp.web` takes 0.34-0.36 s and starlette + uvicorn 0.15-0.22 s, against 0.06-0.07 s for asyncio +
h11 + wsproto. The whole ready-time budget is about 0.25 s (0.15 x `import torch`), so the web framework alone
would spend it. h11 is the sans-IO protocol library maintained by python-hyper; this module is the glue:
read (within limits and deadlines), route, write. The limits follow uvicorn's and aiohttp's defaults; see
`Limits` and the README's reliability section.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import tempfile
from dataclasses import dataclass
from urllib.parse import unquote

import h11

from .requests import Request
from .responses import REASONS, FileResponse, Response, error_response, json_response, storage_error, text_response
from .routing import Router

__all__ = ["HTTPServer", "Limits", "Request", "Response", "FileResponse", "Router", "json_response",
           "text_response", "error_response"]

log = logging.getLogger(__name__)

SERVER_HEADER = b"comfy-serverless"
READ_CHUNK = 65536
WEBSOCKET_PATHS = ("/ws", "/api/ws")
PROBE_PATHS = ("/health", "/ready", "/metrics")
PROBE_RESERVE = 16  # connections beyond --max-connections that may still reach the probes
FD_HEADROOM = 64  # descriptors kept for files, models and pipes when capping connections
SPOOL_THRESHOLD = 1 << 20  # bodies above this go to a temporary file
JSON_IN_THREAD = 256 * 1024  # bodies above this are parsed off the event loop
SENDFILE_PIECE = 1 << 20  # each piece has its own stall deadline
LINGER_BYTES = 4 << 20  # unread body drained after an early error so the client reads our answer


@dataclass(frozen=True)
class Limits:
    max_body: int
    max_header_size: int = 16384
    max_header_count: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 75.0
    max_connections: int = 1000
    max_json_depth: int = 100
    spool_dir: str | None = None

    @classmethod
    def from_settings(cls, settings, spool_dir: str | None = None) -> "Limits":
        return cls(settings.max_upload_bytes, settings.max_header_size, settings.max_header_count,
                   settings.header_timeout, settings.body_timeout, settings.keep_alive_timeout,
                   settings.max_connections, settings.max_json_depth, spool_dir)


class _Reject(Exception):
    """Ends the connection after answering `response` (framing errors, limits, timeouts)."""

    def __init__(self, response: Response | None):
        self.response = response


class _Unsent:
    """Stands for a file region in h11's body accounting; the bytes go out through sendfile."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length


class HTTPServer:
    """Serves a Router; `websocket_handler(request, reader, writer, trailing)` takes over upgraded sockets."""

    def __init__(self, router: Router, limits: Limits, middleware=None, websocket_handler=None,
                 access_log: bool = True):
        self.router = router
        self.limits = limits
        self.max_connections = limits.max_connections
        self.middleware = middleware  # async (request, call_next) -> Response
        self.websocket_handler = websocket_handler
        self.access_log = access_log
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.StreamWriter] = set()
        self._idle: dict[asyncio.StreamWriter, None] = {}  # waiting for a request, oldest first
        self.on_first_response = None  # called once, after the first response is written

    async def start(self, hosts: list[str], port: int, ssl_context=None) -> None:
        self._fit_connection_cap()
        for host in hosts:
            server = await asyncio.start_server(self._serve_connection, host, port, ssl=ssl_context,
                                                reuse_address=True, limit=READ_CHUNK)
            self._servers.append(server)

    def _fit_connection_cap(self) -> None:
        """Raises the descriptor limit to its maximum and keeps the cap below it, so accept() never fails."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            try:
                target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        usable = soft - FD_HEADROOM - PROBE_RESERVE
        if self.max_connections > usable:
            log.warning("--max-connections %d exceeds what %d file descriptors allow; using %d",
                        self.max_connections, soft, max(1, usable))
            self.max_connections = max(1, usable)

    @property
    def bound_ports(self) -> list[int]:
        return [s.getsockname()[1] for server in self._servers for s in server.sockets]

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._connections):
            writer.close()

    # -- one connection ----------------------------------------------------------------------------
    def _admit(self, writer: asyncio.StreamWriter) -> str:
        """'serve', 'probes' (only /health, /ready, /metrics, on the reserve) or 'refuse'.

        At the cap an idle connection (one waiting for its next request) is closed to make room, so idle
        sockets can never lock the probes out; busy ones are bounded by the header and body timeouts.
        """
        if len(self._connections) < self.max_connections:
            return "serve"
        if self._idle:
            oldest = next(iter(self._idle))
            self._idle.pop(oldest)
            oldest.transport.abort()
            return "serve"
        return "probes" if len(self._connections) < self.max_connections + PROBE_RESERVE else "refuse"

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admission = self._admit(writer)
        if admission == "refuse":
            writer.transport.abort()
            return
        probes_only = admission == "probes"
        self._connections.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_size)
        peer = writer.get_extra_info("peername")
        try:
            first = True
            while True:
                head = None
                try:
                    head = await self._read_head(conn, reader, writer, first, probes_only)
                    first = False
                    if head is None:
                        break
                    _check_head(head, self.limits)
                    handler, found = self.router.resolve(head.method.decode(), _path_of(head))
                    early = self._early_answer(head, handler, found, probes_only)
                    if early is not None:
                        await self._write(conn, writer, early, head.method.decode())
                        await self._linger(reader)
                        break
                    if _expects_continue(head.headers):
                        writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                    request = await self._read_body(conn, reader, head, peer)
                except _Reject as reject:
                    if reject.response is not None:  # a HEAD request's answer carries no body
                        await self._write(conn, writer, reject.response, head.method.decode() if head else "GET")
                    break
                if (self.websocket_handler is not None and request.path in WEBSOCKET_PATHS
                        and _is_websocket_upgrade(request)):
                    await self.websocket_handler(request, reader, writer, conn.trailing_data[0])
                    return
                try:
                    response = await self._dispatch(request, handler, found)
                    await self._write(conn, writer, response, request.method)
                finally:
                    request.close()
                if self.on_first_response is not None:
                    callback, self.on_first_response = self.on_first_response, None
                    callback()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, h11.RemoteProtocolError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # the loop's end cancels open connections (a WebSocket at SIGTERM); ending normally keeps Python
            # 3.11's stream callback, which calls task.exception() on it, from logging a CancelledError
            return
        except Exception:
            log.exception("connection error")
        finally:
            self._connections.discard(writer)
            self._idle.pop(writer, None)
            if not writer.is_closing():
                writer.close()

    async def _read_head(self, conn: h11.Connection, reader, writer, first: bool, probes_only: bool):
        """The next request's head, None when the client is gone or idle too long; raises _Reject."""
        loop = asyncio.get_running_loop()
        started = bool(conn.trailing_data[0])  # pipelined bytes already count as a started request
        # A connection on the probe reserve gets a short deadline: probes send their head at once.
        header_timeout = min(self.limits.header_timeout, 1.0) if probes_only else self.limits.header_timeout
        deadline = loop.time() + header_timeout
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint or 400
                raise _Reject(_closing(text_response(f"{status}: {exc}", status))) from None
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                if started:
                    wait = max(deadline - loop.time(), 0.001) if header_timeout > 0 else 0
                else:
                    wait = header_timeout if first else self.limits.keep_alive_timeout
                    self._idle[writer] = None
                try:
                    async with _within(wait):
                        data = await reader.read(READ_CHUNK)
                except TimeoutError:
                    raise _Reject(_closing(error_response(408)) if started else None) from None
                finally:
                    self._idle.pop(writer, None)
                if not data and not started:
                    return None
                if not started:
                    started, deadline = True, loop.time() + header_timeout
                conn.receive_data(data)
                continue
            return None  # ConnectionClosed, or PAUSED after a protocol switch

    def _early_answer(self, head: h11.Request, handler, found, probes_only: bool) -> Response | None:
        """Answers that need no body: they are sent before reading it, and the connection then closes."""
        path = _path_of(head)
        if probes_only and path not in PROBE_PATHS:
            return _closing(json_response({"error": {"type": "too_many_connections",
                                                     "message": "The server is at its connection limit "
                                                                "(--max-connections); try again.",
                                                     "details": "", "extra_info": {}}, "node_errors": {}}, 503))
        length = _content_length(head.headers)
        if length is not None and length > self.limits.max_body:
            return _closing(_too_large(self.limits.max_body, length))
        has_body = (length or 0) > 0 or _is_chunked(head.headers)
        if handler is None and has_body and head.method != b"OPTIONS":
            return _closing(error_response(found))
        return None

    async def _read_body(self, conn: h11.Connection, reader, head: h11.Request, peer) -> Request:
        chunks: list[bytes] = []
        spool = None
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Reject(_closing(text_response(f"400: {exc}", 400))) from None
            if event is h11.NEED_DATA:
                try:
                    async with _within(self.limits.body_timeout):
                        data = await reader.read(READ_CHUNK)
                except TimeoutError:
                    raise _Reject(_closing(error_response(408))) from None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body:
                    if spool is not None:
                        spool.close()
                    raise _Reject(_closing(_too_large(self.limits.max_body, size)))
                try:
                    if spool is None and size > SPOOL_THRESHOLD:
                        spool = tempfile.TemporaryFile(dir=self.limits.spool_dir)
                        spool.writelines(chunks)
                        chunks = []
                    if spool is not None:
                        spool.write(event.data)
                    else:
                        chunks.append(event.data)
                except OSError as exc:  # disk full, quota, file size limit
                    if spool is not None:
                        spool.close()
                    raise _Reject(_closing(storage_error(exc))) from None
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return _make_request(head, b"".join(chunks), spool, peer, self.limits.max_json_depth)
            else:  # ConnectionClosed mid-body
                if spool is not None:
                    spool.close()
                raise _Reject(None)

    async def _dispatch(self, request: Request, handler, found) -> Response:
        async def route(req: Request) -> Response:
            if handler is None:
                return error_response(found)
            req.match_info = found
            return await handler(req)

        try:
            if request.body_size > JSON_IN_THREAD and not request.headers.get("content-type", "").startswith(
                    "multipart/"):
                await asyncio.to_thread(request.parse_json_quietly)
            if self.middleware is not None:
                response = await self.middleware(request, route)
            else:
                response = await route(request)
        except Exception:
            log.exception("error handling %s %s", request.method, request.raw_target)
            response = json_response({"error": {"type": "server_error", "message": "Internal server error",
                                                "details": "see the server log", "extra_info": {}},
                                      "node_errors": {}}, 500)
        if self.access_log:
            log.info("%s %s %s", request.method, request.raw_target, response.status)
        return response

    # -- writing -----------------------------------------------------------------------------------
    async def _write(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response,
                     method: str) -> None:
        file = response if isinstance(response, FileResponse) and response.status in (200, 206) else None
        length = file.length if file is not None else len(response.body)
        headers = [(b"server", SERVER_HEADER), (b"content-length", str(length).encode())]
        if response.content_type:
            headers.append((b"content-type", response.content_type.encode()))
        headers += [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
                    for k, v in response.headers]
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=REASONS.get(response.status, "").encode()))
        except h11.LocalProtocolError:  # the request was unparsable: answer outside h11, then close
            data = (f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
                    f"content-length: {len(response.body)}\r\nconnection: close\r\n\r\n").encode()
            writer.write(data + (response.body if method != "HEAD" else b""))
            await self._drain(writer)
            return
        sends_body = method != "HEAD" and length > 0
        if file is not None and sends_body:
            writer.write(data)
            conn.send_with_data_passthrough(h11.Data(data=_Unsent(length)))  # type: ignore[arg-type]
            await self._send_file(writer, file)
            writer.write(conn.send(h11.EndOfMessage()))
        else:
            if sends_body:
                data += conn.send(h11.Data(data=response.body))
            writer.write(data + conn.send(h11.EndOfMessage()))
        await self._drain(writer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """A client that stops reading for a whole --body-timeout loses its connection."""
        async with _within(self.limits.body_timeout):
            await writer.drain()

    async def _send_file(self, writer: asyncio.StreamWriter, response: FileResponse) -> None:
        loop = asyncio.get_running_loop()
        await self._drain(writer)
        with open(response.path, "rb") as fh:
            offset, left = response.offset, response.length
            while left > 0:
                piece = min(left, SENDFILE_PIECE)
                async with _within(self.limits.body_timeout):
                    sent = await loop.sendfile(writer.transport, fh, offset, piece)
                if sent == 0:  # the file shrank under us: the connection cannot be completed honestly
                    raise ConnectionError("file truncated while sending")
                offset, left = offset + sent, left - sent

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """Reads and drops some unread body, so closing doesn't reset the connection before the client
        has read the answer."""
        try:
            async with asyncio.timeout(2.0):
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await reader.read(READ_CHUNK)
                    if not data:
                        return
                    dropped += len(data)
        except (TimeoutError, ConnectionError):
            pass


def _within(seconds: float):
    """A deadline for one wait; 0 or less means none (every timeout flag takes 0 to switch it off)."""
    return asyncio.timeout(seconds if seconds > 0 else None)


def _path_of(head: h11.Request) -> str:
    return unquote(head.target.decode("latin-1").partition("?")[0])


def _check_head(head: h11.Request, limits: Limits) -> None:
    # h11 enforces the size only while a head is incomplete; one that arrived whole is measured here.
    size = len(head.method) + len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
    if size > limits.max_header_size:
        raise _Reject(_closing(text_response(f"431: request head over {limits.max_header_size} bytes", 431)))
    if len(head.headers) > limits.max_header_count:
        raise _Reject(_closing(text_response(f"431: more than {limits.max_header_count} header fields", 431)))
    if _is_chunked(head.headers) and _content_length(head.headers) is not None:
        raise _Reject(_closing(text_response(
            "400: Content-Length and Transfer-Encoding must not be sent together", 400)))


def _make_request(head: h11.Request, body: bytes, spool, peer, max_json_depth: int) -> Request:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        headers[key] = headers[key] + ", " + value.decode("latin-1") if key in headers \
            else value.decode("latin-1")
    return Request(head.method.decode(), head.target.decode("latin-1"), headers, peer, body, spool,
                   max_json_depth)


def _closing(response: Response) -> Response:
    response.headers.append(("connection", "close"))
    return response


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _is_chunked(headers) -> bool:
    return any(name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in headers)


def _expects_continue(headers) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


def _too_large(limit: int, actual: int) -> Response:
    return text_response(f"Maximum request body size {limit} exceeded, actual body size {actual}", 413)


def _is_websocket_upgrade(request: Request) -> bool:
    return (request.method == "GET" and "websocket" in request.headers.get("upgrade", "").lower()
            and "upgrade" in request.headers.get("connection", "").lower())
