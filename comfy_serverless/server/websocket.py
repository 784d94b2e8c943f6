"""The `/ws` hub: one socket per client id, ComfyUI's message envelope and routing rules (contract 1.7)."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import uuid

from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Request as WSRequest,
                            TextMessage)

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4


class Client:
    def __init__(self, sid: str, writer: asyncio.StreamWriter, ws: WSConnection):
        self.sid = sid
        self.writer = writer
        self.ws = ws
        self.feature_flags: dict = {}
        self.first_message_seen = False
        self.text_parts: list[str] = []

    @property
    def open(self) -> bool:
        return not self.writer.is_closing()

    def send_text(self, text: str) -> None:
        if self.open:
            self.writer.write(self.ws.send(TextMessage(data=text)))

    def send_bytes(self, data: bytes) -> None:
        if self.open:
            self.writer.write(self.ws.send(BytesMessage(data=data)))


class Hub:
    """Routes messages: to one client id, or to every socket when no id is given."""

    def __init__(self, server_features: dict, queue_remaining, reconnect_state):
        self.clients: dict[str, Client] = {}
        self.server_features = server_features
        self.queue_remaining = queue_remaining  # () -> int
        self.reconnect_state = reconnect_state  # () -> (client id of running prompt, executing node id)

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

    # -- connections -------------------------------------------------------------------------------
    async def handle(self, request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     trailing: bytes) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        headers = [(k.encode(), v.encode("latin-1")) for k, v in request.headers.items()]
        ws.initiate_upgrade_connection(headers, request.raw_target)
        for event in ws.events():
            if isinstance(event, WSRequest):
                writer.write(ws.send(AcceptConnection()))
        sid = request.query.get("clientId") or uuid.uuid4().hex
        client = Client(sid, writer, ws)
        self.clients[sid] = client  # a reconnect with the same id replaces the old socket
        client.send_text(json.dumps({"type": "status", "data": {**self.status_message(), "sid": sid}}))
        running_client, node = self.reconnect_state()
        if running_client == sid and node is not None:
            client.send_text(json.dumps({"type": "executing", "data": {"node": node}}))
        try:
            if trailing:
                ws.receive_data(trailing)
                self._process(client)
            while client.open:
                data = await reader.read(65536)
                if not data:
                    break
                ws.receive_data(data)
                if not self._process(client):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.clients.get(sid) is client:
                del self.clients[sid]
            if not writer.is_closing():
                writer.close()

    def _process(self, client: Client) -> bool:
        """Handles received frames; False once the connection is closing."""
        for event in client.ws.events():
            if isinstance(event, Ping):
                client.writer.write(client.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                try:
                    client.writer.write(client.ws.send(event.response()))
                except Exception:
                    pass
                return False
            elif isinstance(event, TextMessage):
                client.text_parts.append(event.data)
                if event.message_finished:
                    text, client.text_parts = "".join(client.text_parts), []
                    self._on_text(client, text)
            elif isinstance(event, Message):
                if event.message_finished and not client.first_message_seen:
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
