"""A small HTTP/1.1 server on asyncio streams, h11 (parsing) and wsproto (WebSocket framing).

Why not aiohttp, which ComfyUI uses: measured on this project's 2-core machine with precompiled bytecode,
`import aiohttp.web` takes 0.34-0.36 s and starlette + uvicorn 0.15-0.22 s, against 0.06-0.07 s for asyncio +
h11 + wsproto. The whole ready-time budget is about 0.25 s (0.15 x `import torch`), so the web framework alone
would spend it. h11 and wsproto are the sans-IO protocol libraries maintained by python-hyper; this module
is only the glue: read, parse, route, write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from urllib.parse import parse_qsl, unquote

import h11

log = logging.getLogger(__name__)

REASONS = {200: "OK", 204: "No Content", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Request Entity Too Large", 416: "Range Not Satisfiable",
           500: "Internal Server Error", 503: "Service Unavailable"}
SERVER_HEADER = b"comfy-serverless"
READ_CHUNK = 65536
WEBSOCKET_PATHS = ("/ws", "/api/ws")


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "match_info", "peer", "raw_target")

    def __init__(self, method: str, target: str, headers: dict, body: bytes, peer):
        self.method = method
        self.raw_target = target
        path, _, query = target.partition("?")
        self.path = unquote(path)
        self.query = dict(reversed(parse_qsl(query, keep_blank_values=True)))  # first value wins, like aiohttp
        self.headers = headers
        self.body = body
        self.match_info: dict[str, str] = {}
        self.peer = peer

    def json(self):
        """Parses the body as JSON whatever the Content-Type (clients post JSON as form data too)."""
        return json.loads(self.body.decode("utf-8"))


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str | None = None,
                 headers: list | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


def json_response(data, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status, "application/json; charset=utf-8")


def text_response(text: str, status: int) -> Response:
    return Response(text.encode(), status, "text/plain; charset=utf-8")


def error_response(status: int) -> Response:
    return text_response(f"{status}: {REASONS.get(status, '')}", status)


class Router:
    """Exact paths and `{name}` segments; every route is also served under /api."""

    def __init__(self):
        self._exact: dict[str, dict[str, object]] = {}
        self._patterns: list[tuple[re.Pattern, dict[str, object]]] = []

    def add(self, method: str, path: str, handler, api_alias: bool = True) -> None:
        for p in (path, "/api" + path) if api_alias else (path,):
            methods = self._table_for(p)
            methods[method] = handler
            if method == "GET":
                methods.setdefault("HEAD", handler)

    def _table_for(self, path: str) -> dict:
        if "{" not in path:
            return self._exact.setdefault(path, {})
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")
        for existing, methods in self._patterns:
            if existing.pattern == regex.pattern:
                return methods
        methods: dict = {}
        self._patterns.append((regex, methods))
        return methods

    def resolve(self, method: str, path: str):
        """(handler, match_info) or (None, status) with status 404 / 405."""
        methods = self._exact.get(path)
        match_info = {}
        if methods is None:
            for regex, candidate in self._patterns:
                m = regex.match(path)
                if m:
                    methods, match_info = candidate, m.groupdict()
                    break
        if methods is None:
            return None, 404
        handler = methods.get(method)
        if handler is None:
            return None, 405 if method != "OPTIONS" else 200
        return handler, match_info


class HTTPServer:
    """Serves a Router; `websocket_handler(request, reader, writer, trailing)` takes over upgraded sockets."""

    def __init__(self, router: Router, max_body: int, middleware=None, websocket_handler=None,
                 access_log: bool = True):
        self.router = router
        self.max_body = max_body
        self.middleware = middleware  # async (request, call_next) -> Response
        self.websocket_handler = websocket_handler
        self.access_log = access_log
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.StreamWriter] = set()
        self.on_first_response = None  # called once, after the first response is written

    async def start(self, hosts: list[str], port: int, ssl_context=None) -> None:
        for host in hosts:
            server = await asyncio.start_server(self._serve_connection, host, port, ssl=ssl_context,
                                                reuse_address=True, limit=READ_CHUNK)
            self._servers.append(server)

    @property
    def bound_ports(self) -> list[int]:
        return [s.getsockname()[1] for server in self._servers for s in server.sockets]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._connections):
            writer.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        peer = writer.get_extra_info("peername")
        try:
            while True:
                request = await self._read_request(conn, reader, writer, peer)
                if request is None:
                    break
                if isinstance(request, Response):  # a framing error, answered then closed
                    await self._write(conn, writer, request, "GET")
                    break
                if (self.websocket_handler is not None and request.path in WEBSOCKET_PATHS
                        and _is_websocket_upgrade(request)):
                    self._connections.discard(writer)
                    await self.websocket_handler(request, reader, writer, conn.trailing_data[0])
                    return
                response = await self._dispatch(request)
                await self._write(conn, writer, response, request.method)
                if self.on_first_response is not None:
                    callback, self.on_first_response = self.on_first_response, None
                    callback()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, h11.RemoteProtocolError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection error")
        finally:
            self._connections.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _read_request(self, conn, reader, writer, peer):
        head = None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint or 400
                return text_response(f"{status}: {exc}", status)
            if event is h11.NEED_DATA:
                data = await reader.read(READ_CHUNK)
                if not data and head is None and conn.their_state is h11.IDLE:
                    return None
                conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                if head is not None:  # an Upgrade request with no body: hand over as is
                    return self._make_request(head, b"".join(chunks), peer)
                return None
            if isinstance(event, h11.Request):
                head = event
                length = _content_length(event.headers)
                if length is not None and length > self.max_body:
                    return _too_large(self.max_body, length)
                if _expects_continue(event.headers):
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    return _too_large(self.max_body, size)
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return self._make_request(head, b"".join(chunks), peer)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    @staticmethod
    def _make_request(head: h11.Request, body: bytes, peer) -> Request:
        headers = {}
        for name, value in head.headers:
            key = name.decode("latin-1")
            headers[key] = headers[key] + ", " + value.decode("latin-1") if key in headers \
                else value.decode("latin-1")
        return Request(head.method.decode(), head.target.decode("latin-1"), headers, body, peer)

    async def _dispatch(self, request: Request) -> Response:
        async def route(req: Request) -> Response:
            handler, found = self.router.resolve(req.method, req.path)
            if handler is None:
                return Response(b"", 200) if found == 200 else error_response(found)
            req.match_info = found
            return await handler(req)

        try:
            if self.middleware is not None:
                response = await self.middleware(request, route)
            else:
                response = await route(request)
        except Exception:
            log.exception("error handling %s %s", request.method, request.raw_target)
            response = text_response("500 Internal Server Error\n\nServer got itself in trouble", 500)
        if self.access_log:
            log.info("%s %s %s", request.method, request.raw_target, response.status)
        return response

    async def _write(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response,
                     method: str) -> None:
        headers = [(b"server", SERVER_HEADER), (b"content-length", str(len(response.body)).encode())]
        if response.content_type:
            headers.append((b"content-type", response.content_type.encode()))
        headers += [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
                    for k, v in response.headers]
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=REASONS.get(response.status, "").encode()))
            if method != "HEAD" and response.body:
                data += conn.send(h11.Data(data=response.body))
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # the request was unparsable: answer outside h11, then close
            data = (f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
                    f"content-length: {len(response.body)}\r\nconnection: close\r\n\r\n").encode() + response.body
        writer.write(data)
        await writer.drain()


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _expects_continue(headers) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


def _too_large(limit: int, actual: int) -> Response:
    response = text_response(f"Maximum request body size {limit} exceeded, actual body size {actual}", 413)
    response.headers.append(("connection", "close"))
    return response


def _is_websocket_upgrade(request: Request) -> bool:
    return (request.method == "GET" and "websocket" in request.headers.get("upgrade", "").lower()
            and "upgrade" in request.headers.get("connection", "").lower())
