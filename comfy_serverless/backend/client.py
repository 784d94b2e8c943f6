"""HTTP requests and a WebSocket connection to the ComfyUI backend, on asyncio with h11 and wsproto.

The front already imports both protocol libraries; aiohttp would add about 190 ms of import to a process
whose point is starting fast.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

READ_CHUNK = 65536


class BackendUnavailable(ConnectionError):
    """The backend did not answer (refused, reset, timed out, or closed the connection)."""


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an http:// URL."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the ComfyUI backend URL must be http://HOST[:PORT], got {url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


class HTTPClient:
    def __init__(self, host: str, port: int, prefix: str = ""):
        self.host, self.port, self.prefix = host, port, prefix

    async def request(self, method: str, path: str, body=None, timeout: float = 30.0) -> tuple[int, bytes]:
        """(status, body bytes); a JSON-able body is sent as JSON. One connection per request: the backend
        is on loopback, and a fresh connection never meets a half-closed keep-alive one."""
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except (OSError, asyncio.TimeoutError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            raise BackendUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def _request(self, method: str, path: str, body) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            data = b"" if body is None else json.dumps(body).encode()
            conn = h11.Connection(h11.CLIENT)
            headers = [("host", f"{self.host}:{self.port}"), ("content-length", str(len(data))),
                       ("connection", "close")]
            if body is not None:
                headers.append(("content-type", "application/json"))
            writer.write(conn.send(h11.Request(method=method, target=self.prefix + path, headers=headers)))
            writer.write(conn.send(h11.Data(data=data)) if data else b"")
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(READ_CHUNK))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, b"".join(chunks)
        finally:
            writer.close()

    async def get_json(self, path: str, timeout: float = 30.0):
        status, data = await self.request("GET", path, timeout=timeout)
        if status != 200:
            raise BackendUnavailable(f"GET {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data)


class WebSocketClient:
    """One /ws connection: `receive()` gives ("text", dict) or ("binary", bytes) messages, None once closed."""

    def __init__(self, http: HTTPClient, client_id: str | None = None):
        self.http = http
        self.client_id = client_id or f"comfy-serverless-{uuid.uuid4().hex}"
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._pending: list = []
        self._parts: list = []

    async def connect(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._connect(), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnavailable(f"/ws: {type(exc).__name__}: {exc}") from exc

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.http.host, self.http.port)
        target = f"{self.http.prefix}/ws?clientId={self.client_id}"
        self.writer.write(self.ws.send(Request(host=f"{self.http.host}:{self.http.port}", target=target)))
        await self.writer.drain()
        while True:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                raise BackendUnavailable("/ws: closed during the handshake")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    # previews with their prompt id (event 4), so each goes to the right client
                    self.send_text(json.dumps({"type": "feature_flags",
                                               "data": {"supports_preview_metadata": True}}))
                    return
                if isinstance(event, RejectConnection):
                    raise BackendUnavailable(f"/ws: upgrade refused with HTTP {event.status_code}")
                self._pending.append(event)

    def send_text(self, text: str) -> None:
        assert self.writer is not None, "connect() first"
        self.writer.write(self.ws.send(TextMessage(data=text)))

    async def receive(self):
        while True:
            for event in self._drain_events():
                if isinstance(event, Ping) and self.writer is not None:
                    self.writer.write(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    return None
                elif isinstance(event, Message):
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        if isinstance(event, TextMessage):
                            try:
                                return "text", json.loads("".join(parts))
                            except ValueError:
                                continue
                        if isinstance(event, BytesMessage):
                            return "binary", b"".join(parts)
            if self.reader is None:
                return None
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError:
                return None
            if not data:
                return None
            self.ws.receive_data(data)

    def _drain_events(self):
        pending, self._pending = self._pending, []
        yield from pending
        yield from self.ws.events()

    def close(self) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.close()
