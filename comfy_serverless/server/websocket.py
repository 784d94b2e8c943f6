"""The `/ws` hub: one socket per client id, ComfyUI's message envelope and routing rules
(docs/comfy-api-contract.md §1.7).

Every connection is bounded (the --ws-* flags): incoming message size, unsent outgoing data, and liveness
through pings, so neither a hostile nor a vanished client can make the server hold memory without limit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import uuid

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Ping, RejectConnection, TextMessage
from wsproto.events import Request as WSRequest
from wsproto.utilities import ProtocolError

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

MB = 1024 * 1024
READ_CHUNK = 65536
CLOSE_GRACE_S = 2.0  # after our Close frame, how long the client may keep talking before the socket is cut
MESSAGE_TOO_BIG = 1009


class Limits:
    """Per-connection bounds from the --ws-* flags; bytes and seconds, 0 turns one off."""

    def __init__(self, max_message: int = 4 * MB, max_send_buffer: int = 16 * MB, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0):
        self.max_message = max_message
        self.max_send_buffer = max_send_buffer
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        if settings is None:
            return cls()
        return cls(int(settings.ws_max_message_size * MB), int(settings.ws_max_send_buffer * MB),
                   float(settings.ws_ping_interval), float(settings.ws_ping_timeout))


class Client:
    def __init__(self, sid: str, writer: asyncio.StreamWriter, ws: WSConnection, hub: "Hub"):
        self.sid = sid
        self.writer = writer
        self.ws = ws
        self.hub = hub
        self.feature_flags: dict = {}
        self.first_message_seen = False
        self.text_parts: list[str] = []
        self.message_size = 0  # bytes of the message being received so far
        self.activity = asyncio.Event()  # set by any incoming data; the ping timeout waits on it
        self.keepalive: asyncio.Task | None = None

    @property
    def open(self) -> bool:
        return self.ws.state is ConnectionState.OPEN and not self.writer.is_closing()

    def send_text(self, text: str) -> None:
        self.send_event(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> None:
        self.send_event(BytesMessage(data=data))

    def send_event(self, event) -> None:
        if not self.open:
            return
        limit = self.hub.limits.max_send_buffer
        if limit > 0 and self.writer.transport.get_write_buffer_size() > limit:
            # it does not read what we send: keeping it would mean buffering without bound
            self.hub.drop(self, f"more than {limit} bytes unsent (client not reading)")
            return
        self.writer.write(self.ws.send(event))

    def close(self, code: int, reason: str) -> None:
        """Starts the closing handshake from our side and forgets any partial message."""
        self.text_parts, self.message_size = [], 0
        if self.ws.state is ConnectionState.OPEN and not self.writer.is_closing():
            self.writer.write(self.ws.send(CloseConnection(code=code, reason=reason)))


def _check_key(key: str) -> None:
    """RFC 6455 4.2.1: exactly one key, the base64 form of 16 bytes (wsproto checks only its presence)."""
    try:
        if len(base64.b64decode(key.strip(), validate=True)) == 16:
            return
    except ValueError:
        pass
    raise ValueError(f"Sec-WebSocket-Key must be 16 bytes in base64, got {key[:40]!r}")


class Hub:
    """Routes messages: to one client id, or to every socket when no id is given."""

    def __init__(self, server_features: dict, queue_remaining, reconnect_state, settings=None):
        self.clients: dict[str, Client] = {}
        self.server_features = server_features
        self.queue_remaining = queue_remaining  # () -> int
        self.reconnect_state = reconnect_state  # () -> (client id of running prompt, executing node id)
        self.limits = settings if isinstance(settings, Limits) else Limits.from_settings(settings)

    # -- sending (event-loop thread only) ---------------------------------------------------------
    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        text = json.dumps({"type": event, "data": data})
        for client in self._targets(sid):
            client.send_text(text)

    def send_binary(self, event: int, payload: bytes, sid: str | None = None) -> None:
        frame = struct.pack(">I", event) + payload
        for client in self._targets(sid):
            client.send_bytes(frame)

    def send_preview(self, image_type: str, image_bytes: bytes, metadata: dict, sid: str | None) -> None:
        """Preview frames: event 4 with metadata for clients that asked for it, else event 1."""
        fmt = 2 if image_type == "image/png" else 1
        meta = json.dumps({**metadata, "image_type": image_type}).encode()
        for client in self._targets(sid):
            if client.feature_flags.get("supports_preview_metadata"):
                client.send_bytes(struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image_bytes)
            else:
                client.send_bytes(struct.pack(">II", PREVIEW_IMAGE, fmt) + image_bytes)

    def _targets(self, sid: str | None):
        if sid is None:
            return list(self.clients.values())
        client = self.clients.get(sid)
        return [client] if client is not None else []

    def status_message(self) -> dict:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def drop(self, client: Client, reason: str) -> None:
        """Cuts a client off at once (no closing handshake: it is not listening)."""
        log.warning("dropping websocket client %s: %s", client.sid, reason)
        self._forget(client)
        client.writer.transport.abort()

    def _forget(self, client: Client) -> None:
        if self.clients.get(client.sid) is client:
            del self.clients[client.sid]

    # -- connections -------------------------------------------------------------------------------
    async def handle(self, request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     trailing: bytes) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        try:
            _check_key(request.headers.get("sec-websocket-key", ""))
            ws.initiate_upgrade_connection(headers, request.raw_target)
            accept = b"".join(ws.send(AcceptConnection()) for e in ws.events() if isinstance(e, WSRequest))
        except (ProtocolError, h11.ProtocolError, ValueError) as exc:  # the client's headers are at fault
            await _reject(writer, exc)
            return
        writer.write(accept)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        client = Client(sid, writer, ws, self)
        self.clients[sid] = client  # a reconnect with the same id replaces the old socket
        client.send_text(json.dumps({"type": "status", "data": {**self.status_message(), "sid": sid}}))
        running_client, node = self.reconnect_state()
        if running_client == sid and node is not None:
            client.send_text(json.dumps({"type": "executing", "data": {"node": node}}))
        if self.limits.ping_interval > 0:
            client.keepalive = asyncio.get_running_loop().create_task(self._keepalive(client))
        try:
            data = trailing
            while client.open:
                if data:
                    client.activity.set()
                    ws.receive_data(data)
                    if not self._process(client):
                        break
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
            if ws.state is ConnectionState.LOCAL_CLOSING:
                await _linger(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except ProtocolError as exc:  # a client fault wsproto raised rather than reported
            log.info("websocket client %s: protocol error: %s", sid, exc)
        finally:
            self._forget(client)
            if client.keepalive is not None:
                client.keepalive.cancel()
            client.text_parts, client.message_size = [], 0
            if not writer.is_closing():
                writer.close()

    def _process(self, client: Client) -> bool:
        """Handles received frames; False once the connection is closing."""
        limit = self.limits.max_message
        for event in client.ws.events():
            if isinstance(event, Ping):
                client.send_event(event.response())
            elif isinstance(event, CloseConnection):
                client.text_parts, client.message_size = [], 0
                if client.ws.state is ConnectionState.OPEN:  # wsproto's report of a malformed frame
                    log.info("websocket client %s: %s (close %s)", client.sid, event.reason, event.code)
                if not client.writer.is_closing() and client.ws.state in (ConnectionState.OPEN,
                                                                         ConnectionState.REMOTE_CLOSING):
                    client.writer.write(client.ws.send(event.response()))
                return False
            elif isinstance(event, Message):
                # counted as the fragments arrive, so an endless message is stopped at the limit
                is_text = isinstance(event, TextMessage)
                client.message_size += len(event.data.encode("utf-8")) if is_text else len(event.data)
                if limit > 0 and client.message_size > limit:
                    log.info("websocket client %s: message over %d bytes, closing", client.sid, limit)
                    client.close(MESSAGE_TOO_BIG, "message too big")
                    return False
                if is_text:
                    client.text_parts.append(event.data)
                if event.message_finished:
                    client.message_size = 0
                    if is_text:
                        text, client.text_parts = "".join(client.text_parts), []
                        self._on_text(client, text)
                    client.first_message_seen = True  # only the first message may negotiate
        return True

    def _on_text(self, client: Client, text: str) -> None:
        first = not client.first_message_seen
        client.first_message_seen = True
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("invalid JSON from websocket client %s: %.100s", client.sid, text)
            return
        if first and isinstance(message, dict) and message.get("type") == "feature_flags":
            flags = message.get("data")
            client.feature_flags = flags if isinstance(flags, dict) else {}
            client.send_text(json.dumps({"type": "feature_flags", "data": self.server_features}))

    async def _keepalive(self, client: Client) -> None:
        """Pings every interval; a client silent for the timeout after a ping is a dead (half-open) socket."""
        interval, timeout = self.limits.ping_interval, self.limits.ping_timeout
        while True:
            await asyncio.sleep(interval)
            if not client.open:
                return
            client.activity.clear()
            client.send_event(Ping())
            if timeout > 0:
                try:
                    await asyncio.wait_for(client.activity.wait(), timeout)
                except asyncio.TimeoutError:
                    if client.open:
                        self.drop(client, f"nothing received within {timeout:g} s of a ping")
                    return


async def _reject(writer: asyncio.StreamWriter, exc: Exception) -> None:
    """Answers an invalid upgrade request with a plain 400, then closes."""
    body = f"400: invalid WebSocket upgrade: {exc}\n".encode("utf-8", "replace")
    extra = b""
    hint = getattr(exc, "event_hint", None)
    if isinstance(hint, RejectConnection):  # e.g. the version we speak, for a wrong Sec-WebSocket-Version
        extra = b"".join(k + b": " + v + b"\r\n" for k, v in hint.headers
                         if isinstance(k, bytes) and isinstance(v, bytes))
    writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                 b"content-length: %d\r\nconnection: close\r\n" % len(body) + extra + b"\r\n" + body)
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def _linger(reader: asyncio.StreamReader) -> None:
    """After our Close frame: discard what the client still sends until it hangs up (or the grace runs out),
    so it reads the Close instead of a reset caused by unread data."""
    try:
        async with asyncio.timeout(CLOSE_GRACE_S):
            while await reader.read(READ_CHUNK):
                pass
    except TimeoutError:
        pass
