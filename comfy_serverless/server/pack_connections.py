"""Answers of node pack routes that need the connection itself: streams, and WebSocket handlers.

Most pack answers are a body known when the handler returns (pack_routes.py collects it). Two kinds are not:

- A `web.StreamResponse` the handler prepared and keeps writing to (server-sent events, progress streams,
  large generated files). Its writes go through a bounded queue (`StreamWriter`) to the connection as they
  come: the head is sent when the handler calls prepare(), each write() becomes an HTTP/1.1 chunk, and a slow
  client holds the handler back. A client that leaves cancels the handler at its next write.
- A WebSocket upgrade to a pack's route. The connection is handed to aiohttp's own server protocol, which runs
  the request again on it: the handler gets aiohttp's real `WebSocketResponse` (handshake, framing, ping/pong,
  close codes, `async for msg in ws`), exactly what the pack was written against. Re-implementing that class on
  wsproto (the front's /ws, websocket.py) would mean copying aiohttp's semantics call by call, and feeding it a
  fake transport would tie us to aiohttp's private protocol fields; handing over the socket costs neither. The
  front's own /ws stays on wsproto, so aiohttp is still imported only when a pack route is first called.

`PackHTTPServer` is the front's HTTP server with the one hook these need: an answer of type `ConnectionAnswer`
writes itself to the connection instead of being written as a whole body.
"""

from __future__ import annotations

import asyncio
import logging
import zlib

import h11

from .http import SERVER_HEADER, HTTPServer
from .responses import REASONS, Response

log = logging.getLogger(__name__)

STREAM_QUEUE = 16  # writes a streaming handler may be ahead of the client


class ConnectionAnswer(Response):
    """A response that writes itself: `send(server, conn, reader, writer, method)`."""

    async def send(self, server: "PackHTTPServer", conn: h11.Connection, reader, writer, method: str) -> None:
        raise NotImplementedError


class PackHTTPServer(HTTPServer):
    """The front's HTTP server; ConnectionAnswer responses get the connection (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._readers: dict[asyncio.StreamWriter, asyncio.StreamReader] = {}

    async def _serve_connection(self, reader, writer) -> None:
        self._readers[writer] = reader
        try:
            await super()._serve_connection(reader, writer)
        finally:
            self._readers.pop(writer, None)

    async def _write(self, conn, writer, response, method) -> None:
        if isinstance(response, ConnectionAnswer):
            await response.send(self, conn, self._readers.get(writer), writer, method)
        else:
            await super()._write(conn, writer, response, method)

    async def drain(self, writer: asyncio.StreamWriter) -> None:
        """A client that stops reading for a whole --body-timeout loses its connection."""
        timeout = self.limits.body_timeout
        async with asyncio.timeout(timeout if timeout > 0 else None):
            await writer.drain()


# -- streams ----------------------------------------------------------------------------------------------------

_stream_writer = None


def stream_writer_class():
    """aiohttp's AbstractStreamWriter over a bounded queue (made on first use: its base class is aiohttp's).

    The status line and headers resolve `head`; each write is a queue item (b"" never); None ends the body.
    """
    global _stream_writer
    if _stream_writer is not None:
        return _stream_writer
    from aiohttp.abc import AbstractStreamWriter

    class StreamWriter(AbstractStreamWriter):
        def __init__(self):
            self.head: asyncio.Future = asyncio.get_running_loop().create_future()
            self.queue: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
            self.compressor = None
            self.eof = False
            self.buffer_size = 0
            self.output_size = 0
            self.length = None

        async def write(self, chunk) -> None:
            data = bytes(chunk)
            if self.compressor is not None:  # flushed per write, so each event reaches the client now
                data = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
            if data:
                self.output_size += len(data)
                await self.queue.put(data)

        async def write_eof(self, chunk: bytes = b"") -> None:
            if self.eof:
                return
            if chunk:
                await self.write(chunk)
            if self.compressor is not None:
                tail = self.compressor.flush()
                if tail:
                    await self.queue.put(tail)
            self.eof = True
            await self.queue.put(None)

        async def drain(self) -> None:
            pass

        def enable_compression(self, encoding: str = "deflate", strategy=None) -> None:
            bits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
            self.compressor = zlib.compressobj(wbits=bits, strategy=zlib.Z_DEFAULT_STRATEGY
                                               if strategy is None else strategy)

        def enable_chunking(self) -> None:
            pass  # our HTTP layer frames the body itself

        async def write_headers(self, status_line: str, headers) -> None:
            if not self.head.done():
                self.head.set_result((int(status_line.split()[1]), headers))

        def send_headers(self) -> None:
            pass

        def collected(self) -> bytes:
            """The whole body, once the handler has finished (every write is in the queue)."""
            parts = []
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if item is not None:
                    parts.append(item)
            return b"".join(parts)

    _stream_writer = StreamWriter
    return StreamWriter


class StreamedResponse(ConnectionAnswer):
    """A pack handler's body sent while the handler (`task`) still writes it, as HTTP/1.1 chunks."""

    __slots__ = ("source", "task", "what")

    def __init__(self, status: int, content_type: str | None, headers: list, source, task: asyncio.Task,
                 what: str):
        super().__init__(b"", status, content_type, headers)
        self.source = source  # the StreamWriter the handler writes to
        self.task = task
        self.what = what  # "GET /path", for the log

    async def send(self, server, conn, reader, writer, method: str) -> None:
        headers = [(b"server", SERVER_HEADER)]
        if self.content_type:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        headers += [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in self.headers]
        try:
            writer.write(conn.send(h11.Response(status_code=self.status, headers=headers,
                                                reason=REASONS.get(self.status, "").encode())))
            await server.drain(writer)
            if method != "HEAD":
                while (chunk := await self._next_chunk()) is not None:
                    writer.write(conn.send(h11.Data(data=chunk)))
                    await server.drain(writer)
            writer.write(conn.send(h11.EndOfMessage()))
            await server.drain(writer)
        except (ConnectionError, TimeoutError, h11.LocalProtocolError) as exc:
            log.info("stream of node pack route %s ended early: %s", self.what, exc or type(exc).__name__)
            raise ConnectionError("stream ended early") from None  # closes the connection: the body is cut
        finally:
            if not self.task.done():
                self.task.cancel()

    async def _next_chunk(self) -> bytes | None:
        queue = self.source.queue
        while True:
            if not queue.empty():
                return queue.get_nowait()
            if self.task.done():
                if not self.task.cancelled() and self.task.exception() is not None:
                    raise ConnectionError("the handler failed while streaming")  # logged where it ran
                return None
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            getter.cancel()


# -- WebSocket handlers -----------------------------------------------------------------------------------------

class _Relay(asyncio.Protocol):
    """Passes a connection's events to aiohttp's protocol and says when the connection is gone."""

    def __init__(self, target, closed: asyncio.Future):
        self.target = target
        self.closed = closed

    def connection_made(self, transport) -> None:
        self.target.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.target.data_received(data)

    def eof_received(self):
        return self.target.eof_received()

    def pause_writing(self) -> None:
        self.target.pause_writing()

    def resume_writing(self) -> None:
        self.target.resume_writing()

    def connection_lost(self, exc) -> None:
        try:
            self.target.connection_lost(exc)
        finally:
            if not self.closed.done():
                self.closed.set_result(None)


class HandedOver(ConnectionAnswer):
    """A WebSocket upgrade to a pack route: the connection goes to aiohttp's server protocol (`protocol()` makes
    one, for an aiohttp app serving this route), which reads the request again from `raw` onwards."""

    __slots__ = ("protocol", "raw")

    def __init__(self, protocol, raw: bytes):
        super().__init__(b"", 101)
        self.protocol = protocol
        self.raw = raw

    async def send(self, server, conn, reader, writer, method: str) -> None:
        transport = writer.transport
        pending = self.raw + conn.trailing_data[0]
        buffered = getattr(reader, "_buffer", None)  # bytes asyncio read but nobody consumed yet
        if buffered:
            pending += bytes(buffered)
            buffered.clear()
        closed = asyncio.get_running_loop().create_future()
        relay = _Relay(self.protocol(), closed)
        transport.set_protocol(relay)
        relay.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()  # the stream reader may have paused it
        if pending:
            relay.data_received(pending)
        await closed  # aiohttp owns the connection until it closes


def raw_request(request) -> bytes:
    """The request as it came (head and body), for a protocol that reads it again."""
    body = request.body or b""
    lines = [f"{request.method} {request.raw_target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()
              if name.lower() not in ("content-length", "transfer-encoding")]  # the body is whole by now
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
