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

import json
import logging
import os
import struct

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
        """Connected WebSocket clients by client id (read-only copy)."""
        app = self._app
        return dict(app.hub.clients) if app is not None else {}

    @property
    def client_session(self):
        return None

    # -- messages -------------------------------------------------------------------------------------------------
    def send_sync(self, event, data, sid: str | None = None) -> None:
        """Sends a message from any thread: to client `sid`, or to every client when sid is None. A string event
        with a JSON-able dict is a `{"type", "data"}` text frame; a BinaryEventTypes number with bytes is a
        binary frame; UNENCODED_PREVIEW_IMAGE takes (format, PIL image, max size) and
        PREVIEW_IMAGE_WITH_METADATA ((format, PIL image, max size), metadata)."""
        app = self._app
        if app is None or app.loop is None:
            log.debug("send_sync(%r) without a running server: dropped", event)
            return
        message = self._frame(app, event, data)  # encoded in the calling thread, not on the event loop
        if message is not None:
            try:
                call_on_loop(app.loop, _deliver, app.hub, message, sid)
            except RuntimeError:  # the loop closed at exit
                pass

    async def send(self, event, data, sid: str | None = None) -> None:
        app = self._app
        if app is None:
            return
        message = self._frame(app, event, data)
        if message is not None:
            _deliver(app.hub, message, sid)

    async def send_json(self, event, data, sid: str | None = None) -> None:
        await self.send(event, data, sid)

    async def send_bytes(self, event, data, sid: str | None = None) -> None:
        await self.send(event, bytes(data), sid)

    def send_progress_text(self, text, node_id, sid: str | None = None) -> None:
        """Text shown on a node while it runs: a binary TEXT frame [3][length of node id][node id][text]."""
        text = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        node = str(node_id).encode("utf-8")
        self.send_sync(BinaryEventTypes.TEXT, struct.pack(">I", len(node)) + node + text, sid)

    @staticmethod
    def encode_bytes(event: int, data: bytes) -> bytes:
        return struct.pack(">I", int(event)) + bytes(data)

    def queue_updated(self) -> None:
        app = self._app
        if app is not None:
            app._queue_changed()

    def get_queue_info(self) -> dict:
        app = self._app
        return {"exec_info": {"queue_remaining": app.queue.remaining() if app is not None else 0}}

    def _frame(self, app, event, data):
        """(kind, payload): ("json", (event, data)), ("binary", (event, bytes)) or ("preview", (...))."""
        if event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
            encoded = _encode_preview(app, data)
            if encoded is None:
                return None
            image_type, image = encoded
            kind = 2 if image_type == "image/png" else 1
            return "binary", (BinaryEventTypes.PREVIEW_IMAGE, struct.pack(">I", kind) + image)
        if event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
            preview, metadata = data
            encoded = _encode_preview(app, preview)
            if encoded is None:
                return None
            return "preview", (encoded[0], encoded[1], dict(metadata or {}))
        if isinstance(data, (bytes, bytearray, memoryview)):
            return "binary", (int(event), bytes(data))
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            log.warning("send_sync(%r): the data cannot be sent as JSON (%s); dropped", event, exc)
            return None
        return "json", (event, data)

    # -- prompt hooks -----------------------------------------------------------------------------------------------
    def add_on_prompt_handler(self, handler) -> None:
        """`handler(json_data) -> json_data` runs on every POST /prompt body before validation."""
        self._routes.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data):
        return self._routes.trigger_on_prompt(json_data)


def _encode_preview(app, preview):
    from comfy_serverless.server.previews import encode_preview

    return encode_preview(preview, app.settings.preview_size)


def _deliver(hub, message, sid) -> None:
    kind, payload = message
    if kind == "json":
        hub.send(payload[0], payload[1], sid)
    elif kind == "binary":
        hub.send_binary(payload[0], payload[1], sid)
    else:
        hub.send_preview(payload[0], payload[1], payload[2], sid)


__all__ = ["PromptServer", "BinaryEventTypes"]
