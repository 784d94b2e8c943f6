"""ComfyUI's `server` module for node packs: `PromptServer.instance` and `BinaryEventTypes`.

`PromptServer.instance` is the server whose thread is running (packs are imported in a server's warm-up or
worker thread, and their nodes run in its worker thread), so two servers in one process never share routes or
messages. Packs use it at import time to register HTTP routes (`PromptServer.instance.routes.get(...)`,
`.app.add_routes(...)`; served by comfy_serverless/server/pack_routes.py, also under /api) and while their
nodes run to message clients (`send_sync`, `send_progress_text`). In a process without a server (the catalogue
snapshot command, tools) the same object collects routes and drops messages.

A face over comfy_serverless.server.pack_routes and the server's WebSocket hub; nothing here imports aiohttp.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import struct
import sys

from comfy_serverless import context
from comfy_serverless.server import pack_routes
from comfy_serverless.server.warmup import call_on_loop

log = logging.getLogger("comfy_serverless.packs")


class BinaryEventTypes:
    """The first four bytes of a binary WebSocket frame (docs/comfy-api-contract.md §1.7)."""

    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class _PromptQueueView:
    """`PromptServer.instance.prompt_queue`: the read side of the server's queue."""

    def __init__(self, server: "PromptServer"):
        self._server = server

    def get_current_queue(self):
        app = self._server._app
        return (app.queue.running(), app.queue.pending()) if app is not None else ([], [])

    get_current_queue_volatile = get_current_queue

    def get_tasks_remaining(self) -> int:
        app = self._server._app
        return app.queue.remaining() if app is not None else 0


class _AppRouter:
    """`PromptServer.instance.app.router`: aiohttp's UrlDispatcher methods packs call. Routes added here are
    served at their own path only (not under /api), as in ComfyUI."""

    def __init__(self, routes: pack_routes.PackRoutes):
        self._routes = routes

    def add_route(self, method: str, path: str, handler, **kwargs):
        return self._routes.add_route(method, path, handler, api_alias=False, kwargs=kwargs)

    def add_get(self, path: str, handler, **kwargs):
        return self.add_route("GET", path, handler, **kwargs)

    def add_head(self, path: str, handler, **kwargs):
        return self.add_route("HEAD", path, handler, **kwargs)

    def add_post(self, path: str, handler, **kwargs):
        return self.add_route("POST", path, handler, **kwargs)

    def add_put(self, path: str, handler, **kwargs):
        return self.add_route("PUT", path, handler, **kwargs)

    def add_patch(self, path: str, handler, **kwargs):
        return self.add_route("PATCH", path, handler, **kwargs)

    def add_delete(self, path: str, handler, **kwargs):
        return self.add_route("DELETE", path, handler, **kwargs)

    def add_view(self, path: str, handler, **kwargs):
        return self.add_route("*", path, handler, **kwargs)

    def add_static(self, prefix: str, path, **kwargs):
        return self._routes.add_static(prefix, os.fspath(path), kwargs)

    def add_routes(self, definitions) -> list:
        return _add_definitions(self._routes, definitions)


def _add_definitions(routes: pack_routes.PackRoutes, definitions) -> list:
    """aiohttp RouteDef / StaticDef objects (from `web.get(...)`, `web.static(...)` or a RouteTableDef)."""
    added = []
    for definition in definitions:
        if hasattr(definition, "handler"):
            added.append(routes.add_route(definition.method, definition.path, definition.handler,
                                          api_alias=False, kwargs=dict(getattr(definition, "kwargs", {}) or {})))
        elif hasattr(definition, "prefix"):
            added.append(routes.add_static(definition.prefix, os.fspath(definition.path),
                                           dict(getattr(definition, "kwargs", {}) or {})))
        else:
            raise TypeError(f"cannot add {definition!r} as a route")
    return added


class _AppFacade(dict):
    """`PromptServer.instance.app`: what packs use of aiohttp's Application. It is a dict (packs keep state in
    `app[...]`); middlewares and lifecycle hooks are kept but not run (pack_routes.py says why)."""

    def __init__(self, routes: pack_routes.PackRoutes):
        super().__init__()
        self.router = _AppRouter(routes)
        self.middlewares: list = []
        self.on_startup: list = []
        self.on_shutdown: list = []
        self.on_cleanup: list = []
        self.on_response_prepare: list = []

    def add_routes(self, definitions) -> list:
        return self.router.add_routes(definitions)

    def __hash__(self):  # usable as a key, like aiohttp's Application
        return id(self)

    def __eq__(self, other):
        return self is other


class _CurrentServer:
    """`PromptServer.instance`: resolved on every access to the server whose thread is running."""

    def __get__(self, instance, owner) -> "PromptServer":
        return _for_context(context.current())


def _for_context(server_context) -> "PromptServer":
    routes = pack_routes.registry(server_context)  # first: slots are made under the context's lock
    return server_context.slot("prompt_server", lambda: PromptServer(server_context, routes))


class PromptServer:
    """What ComfyUI packs know as the server (`from server import PromptServer`)."""

    instance = _CurrentServer()

    def __init__(self, server_context=None, routes: pack_routes.PackRoutes | None = None):
        self._context = server_context if server_context is not None else context.current()
        self._routes = routes if routes is not None else pack_routes.registry(self._context)
        self.routes = self._routes.table
        self.app = _AppFacade(self._routes)
        self.prompt_queue = _PromptQueueView(self)
        self.supports = ["custom_nodes_from_web"]
        self.web_root = os.path.join(self._context.folders.temp, "web")  # no frontend is served

    # -- what the server knows ----------------------------------------------------------------------------------
    @property
    def _app(self):
        # An App puts itself in its context's "app" slot as it is made; a context without a server (the
        # snapshot command, tools) gets None there for good.
        return self._context.slot("app", lambda: None)

    @property
    def loop(self):
        app = self._app
        return app.loop if app is not None else None

    @property
    def client_id(self) -> str | None:
        """The client of the running prompt (None when it was queued without one, or nothing runs)."""
        app = self._app
        return app.worker.running_client if app is not None else None

    @property
    def last_node_id(self) -> str | None:
        app = self._app
        return app.worker.executing_node if app is not None else None

    @property
    def last_prompt_id(self) -> str | None:
        app = self._app
        return app.worker._prompt if app is not None else None

    @property
    def number(self) -> int:
        app = self._app
        return app.prompt_counter if app is not None else 0

    @property
    def sockets(self) -> dict:
        """Connected /ws clients by client id (a copy), each with aiohttp's async send_str / send_bytes /
        send_json / close."""
        app = self._app
        return {sid: _Socket(client) for sid, client in app.hub.clients.items()} if app is not None else {}

    @property
    def client_session(self):
        return None

    # -- messages (ComfyUI 0.3.64's rules: server.py send / send_json / send_bytes / send_image*) ---------------------
    def send_sync(self, event, data, sid: str | None = None) -> None:
        """Sends a message from any thread, in order with the server's own: to client `sid`, or to every client
        when sid is None, as `send` would. Encoded in the calling thread; what cannot be sent is logged and
        dropped (ComfyUI fails it later, on its event loop), never raised at the caller."""
        app = self._app
        if app is None or app.loop is None:
            log.debug("send_sync(%r) without a running server: dropped", event)
            return
        try:
            message = _frame(app, event, data)
        except (RuntimeError, TypeError, ValueError) as exc:
            log.warning("send_sync(%r): %s; dropped", event, exc)
            return
        if message is not None:
            try:
                call_on_loop(app.loop, _deliver, app.hub, message, sid)
            except RuntimeError:  # the loop closed at exit
                pass

    async def send(self, event, data, sid: str | None = None) -> None:
        """UNENCODED_PREVIEW_IMAGE data is (format, PIL image, max size) and PREVIEW_IMAGE_WITH_METADATA data
        ((format, PIL image, max size), metadata): both are encoded; bytes go as a binary frame with `event` as
        its type; anything else as JSON."""
        await self._send_now(_frame(self._app, event, data), sid)

    async def send_json(self, event, data, sid: str | None = None) -> None:
        """A `{"type": event, "data": data}` text frame, whatever event is."""
        await self._send_now(("json", (event, data)), sid)

    async def send_bytes(self, event, data, sid: str | None = None) -> None:
        """A binary frame `[event][data]`; event must be an integer (RuntimeError otherwise, as in ComfyUI)."""
        await self._send_now(("binary", (_event_number(event), bytes(data))), sid)

    async def send_image(self, image_data, sid: str | None = None) -> None:
        """(format, PIL image, max size): a PREVIEW_IMAGE frame [1][1 JPEG / 2 PNG][image]."""
        await self._send_now(_frame(self._app, BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, image_data), sid)

    async def send_image_with_metadata(self, image_data, metadata=None, sid: str | None = None) -> None:
        """A PREVIEW_IMAGE_WITH_METADATA frame [4][length][JSON metadata with image_type][image]."""
        await self._send_now(_frame(self._app, BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, (image_data, metadata)),
                             sid)

    async def _send_now(self, message, sid) -> None:
        app = self._app
        if app is not None and message is not None:
            _deliver(app.hub, message, sid)

    def send_progress_text(self, text, node_id, sid: str | None = None) -> None:
        """Text shown on a node while it runs: a binary TEXT frame [3][length of node id][node id][text]."""
        text = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        node = str(node_id).encode("utf-8")
        self.send_sync(BinaryEventTypes.TEXT, struct.pack(">I", len(node)) + node + text, sid)

    @staticmethod
    def encode_bytes(event: int, data) -> bytearray:
        return bytearray(struct.pack(">I", _event_number(event))) + bytes(data)

    def queue_updated(self) -> None:
        app = self._app
        if app is not None:
            app._queue_changed()

    def get_queue_info(self) -> dict:
        app = self._app
        return {"exec_info": {"queue_remaining": app.queue.remaining() if app is not None else 0}}

    # -- prompt hooks -----------------------------------------------------------------------------------------------
    def add_on_prompt_handler(self, handler) -> None:
        """`handler(json_data) -> json_data` runs on every POST /prompt body before validation."""
        self._routes.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data):
        return self._routes.trigger_on_prompt(json_data)


def _event_number(event) -> int:
    if not isinstance(event, int):
        raise RuntimeError(f"Binary event types must be integers, got {event}")
    return event


def _frame(app, event, data):
    """What `send` makes of (event, data): ("json", (event, data)) or ("binary", (event number, payload))."""
    if app is None:
        return None
    if event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
        mime, image = _encode_image(data)
        return "binary", (BinaryEventTypes.PREVIEW_IMAGE, struct.pack(">I", 2 if mime == "image/png" else 1) + image)
    if event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
        preview, metadata = data
        mime, image = _encode_image(preview)
        metadata = {} if metadata is None else metadata
        metadata["image_type"] = mime  # the caller's dict gets it too, as in ComfyUI
        text = json.dumps(metadata).encode("utf-8")
        return "binary", (BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, struct.pack(">I", len(text)) + text + image)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return "binary", (_event_number(event), bytes(data))
    json.dumps({"type": event, "data": data})  # TypeError now rather than on the event loop
    return "json", (event, data)


def _encode_image(image_data) -> tuple[str, bytes]:
    """(format, PIL image, max size) as ComfyUI encodes previews a pack sends: resized to fit max size (larger
    or smaller, bilinear; None keeps the size), PNG when format is "PNG", else JPEG at quality 95."""
    from io import BytesIO

    from PIL import Image, ImageOps

    image_type, image, max_size = image_data
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = BytesIO()
    if image_type == "PNG":
        image.save(buffer, format="PNG", compress_level=1)
        return "image/png", buffer.getvalue()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return "image/jpeg", buffer.getvalue()


def _deliver(hub, message, sid) -> None:
    kind, payload = message
    if kind == "json":
        hub.send(payload[0], payload[1], sid)
    else:
        hub.send_binary(payload[0], payload[1], sid)


async def send_socket_catch_exception(function, message) -> None:
    """Awaits `function(message)` (a socket's send method), logging a connection that broke instead of raising."""
    errors: tuple = (ConnectionError, BrokenPipeError)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        errors += (aiohttp.ClientError,)
    try:
        result = function(message)
        if inspect.isawaitable(result):
            await result
    except errors as err:
        log.warning("send error: %s", err)


class _Socket:
    """A client of the server's /ws as packs reach it in `PromptServer.instance.sockets` (aiohttp's
    WebSocketResponse methods they call)."""

    def __init__(self, client):
        self._client = client

    @property
    def closed(self) -> bool:
        return not self._client.open

    async def send_str(self, data: str, compress=None) -> None:
        self._client.send_text(data)

    async def send_bytes(self, data, compress=None) -> None:
        self._client.send_bytes(bytes(data))

    async def send_json(self, data, compress=None, *, dumps=json.dumps) -> None:
        self._client.send_text(dumps(data))

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self._client.close(code, message.decode("utf-8", "replace") if isinstance(message, bytes) else message)
        return True


__all__ = ["PromptServer", "BinaryEventTypes", "send_socket_catch_exception"]
