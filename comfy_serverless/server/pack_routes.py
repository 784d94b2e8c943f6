"""HTTP routes that node packs register the way ComfyUI packs do, served by this server.

Packs add routes at import time through `PromptServer.instance.routes` (a table shaped like aiohttp's
`RouteTableDef`: `@routes.get("/my_pack/x")`, `.post`, `.route(method, path)`, `.static(prefix, folder)`)
or `PromptServer.instance.app` (`add_routes([web.get(...)])`, `router.add_get(...)`, `router.add_static(...)`).
Each server keeps them in a `PackRoutes` (a slot of its ServerContext). Packs are often imported after the
server listens (warm-up, or the first prompt in lazy mode), so routes added later are put on the live router.

As in ComfyUI, routes added through `routes` are also served under `/api` (docs/comfy-api-contract.md §1.1);
routes added to `app` directly and static folders are not; a pack never replaces one of the server's own routes.
The catalogue snapshot records each pack's routes (catalog/packs.py), so a lazy server, which imports a pack
only when something needs it, imports the pack on the first request to one of its routes and then serves it.

Handlers are aiohttp handlers: they take an aiohttp `web.Request` and return a `web.Response`,
`web.json_response(...)`, `web.FileResponse`, a `web.StreamResponse` they wrote to, or raise a
`web.HTTPException`. The bridge builds a real aiohttp request from ours (headers, query, match_info, peer, body)
and turns what the handler returns into our Response; a handler that raises gets a 500 in ComfyUI's error
shape, never a dropped connection. aiohttp is imported (0.2-0.35 s) only when a pack route is first called,
in a thread so the event loop keeps answering, unless the pack imported it itself.

A handler that prepares a `web.StreamResponse` and goes on writing (server-sent events, progress streams) is
answered while it writes, and a WebSocket upgrade to a pack route is served by aiohttp's own WebSocket code on
the handed-over connection; `web.FileResponse` is sent from disk in pieces (pack_connections.py says how).

Limits: aiohttp middlewares and on_startup/on_shutdown hooks a pack adds to `app` are accepted but not run;
a WebSocket handler's `request.app` is a small aiohttp Application holding that route, not `PromptServer.app`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import mimetypes
import os
import re
import sys
import threading
from typing import Any

from .. import context, paths
from ..catalog import packs
from .pack_connections import HandedOver, StreamedResponse, raw_request, stream_writer_class
from .responses import FileResponse, Response, error_response, json_response, text_response
from .routing import path_pattern
from .warmup import call_on_loop

log = logging.getLogger(__name__)

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
BODY_IN_THREAD = 1 << 20  # spooled bodies larger than this are read off the event loop
# Framing headers our HTTP layer writes itself (from the body it sends).
_FRAMING = {"content-length", "transfer-encoding", "connection", "server", "date", "keep-alive"}


class RouteDef:
    """One route a pack registered (the fields of aiohttp's RouteDef)."""

    __slots__ = ("method", "path", "handler", "kwargs", "websocket_server")

    def __init__(self, method: str, path: str, handler, kwargs: dict):
        self.method = method
        self.path = path
        self.handler = handler
        self.kwargs = kwargs
        self.websocket_server: Any = None  # aiohttp's server for WebSocket upgrades to this route, made on first use

    def __repr__(self) -> str:
        return f"<RouteDef {self.method} {self.path} -> {getattr(self.handler, '__qualname__', self.handler)!r}>"


class StaticDef:
    """A folder served under a prefix (the fields of aiohttp's StaticDef)."""

    __slots__ = ("prefix", "path", "kwargs")

    def __init__(self, prefix: str, path: str, kwargs: dict):
        self.prefix = prefix
        self.path = path
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"<StaticDef {self.prefix} -> {self.path}>"


class RouteTable:
    """`PromptServer.instance.routes`: aiohttp's RouteTableDef decorators, without importing aiohttp."""

    def __init__(self, registry: "PackRoutes"):
        self._registry = registry
        self._items: list = []

    def route(self, method: str, path: str, **kwargs):
        def register(handler):
            self._items.append(self._registry.add_route(method, path, handler, api_alias=True, kwargs=kwargs))
            return handler

        return register

    def head(self, path: str, **kwargs):
        return self.route("HEAD", path, **kwargs)

    def get(self, path: str, **kwargs):
        return self.route("GET", path, **kwargs)

    def post(self, path: str, **kwargs):
        return self.route("POST", path, **kwargs)

    def put(self, path: str, **kwargs):
        return self.route("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs):
        return self.route("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.route("DELETE", path, **kwargs)

    def view(self, path: str, **kwargs):
        return self.route("*", path, **kwargs)

    def static(self, prefix: str, path, **kwargs) -> None:
        self._items.append(self._registry.add_static(prefix, os.fspath(path), kwargs))

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        return self._items[index]

    def __contains__(self, item) -> bool:
        return item in self._items

    def __repr__(self) -> str:
        return f"<RouteTable with {len(self._items)} routes>"


class PackRoutes:
    """The routes node packs registered with one server; put on its router as soon as it has one."""

    def __init__(self):
        self.table = RouteTable(self)
        self.entries: list[tuple[object, bool]] = []  # (RouteDef or StaticDef, served under /api too)
        self.on_prompt_handlers: list = []  # PromptServer.add_on_prompt_handler: body -> body, at POST /prompt
        self._lock = threading.Lock()
        self._app = None
        self._router = None

    def add_route(self, method: str, path: str, handler, api_alias: bool = False, kwargs: dict | None = None):
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"a route path must start with '/': {path!r}")
        route = RouteDef(method.upper(), path, handler, dict(kwargs or {}))
        self._add(route, api_alias)
        packs.note_route(route.method, path, api_alias)
        return route

    def add_static(self, prefix: str, directory: str, kwargs: dict | None = None):
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError(f"a static prefix must start with '/': {prefix!r}")
        static = StaticDef(prefix.rstrip("/") or "/", os.path.abspath(directory), dict(kwargs or {}))
        self._add(static, False)
        packs.note_route("STATIC", static.prefix, False)
        return static

    def _add(self, entry, api_alias: bool) -> None:
        with self._lock:
            self.entries.append((entry, api_alias))
            app = self._app
        if app is not None:
            call_on_loop(app.loop, self._install, entry, api_alias)

    def attach(self, app, router) -> None:
        """Serves every route registered so far on `router`, and later ones as they come (event loop)."""
        with self._lock:
            self._app, self._router = app, router
            pending = list(self.entries)
        for entry, api_alias in pending:
            self._install(entry, api_alias)
        router.fallback = _NotImportedYet(app, router).resolve

    def _install(self, entry, api_alias: bool) -> None:
        router = self._router
        if isinstance(entry, StaticDef):
            router.add("GET", _static_path(entry.prefix), _static_handler(entry), api_alias=False,
                       keep_existing=True)
            log.debug("node pack static folder %s -> %s", entry.prefix, entry.path)
            return
        handler = _bridge(entry, self._app)
        methods = METHODS if entry.method == "*" else (entry.method,)
        for method in methods:
            router.add(method, entry.path, handler, api_alias=api_alias, keep_existing=True)
        log.debug("node pack route %s %s%s", entry.method, entry.path, " (also under /api)" if api_alias else "")

    def trigger_on_prompt(self, body):
        """Runs the packs' on-prompt handlers over a POST /prompt body (a failing one is logged and skipped)."""
        for handler in list(self.on_prompt_handlers):
            try:
                body = handler(body)
            except Exception:
                log.exception("on_prompt handler %r failed; the prompt goes on without it", handler)
        return body


def registry(server_context=None) -> PackRoutes:
    """The pack routes of a server (the current one by default)."""
    return (server_context or context.current()).slot("pack_routes", PackRoutes)


def attach(app, router) -> None:
    """Called by App.start once its router exists."""
    registry(app.context).attach(app, router)


def on_prompt(app, body):
    """A POST /prompt body after the handlers packs added with PromptServer.add_on_prompt_handler."""
    routes = registry(app.context)
    return routes.trigger_on_prompt(body) if routes.on_prompt_handlers else body


# -- routes of packs a lazy server has not imported yet ---------------------------------------------------------

def _static_path(prefix: str) -> str:
    return ("" if prefix == "/" else prefix) + "/{filename:.*}"


class _NotImportedYet:
    """The router's fallback: a path that only a not-yet-imported pack serves (known from the catalogue
    snapshot) is answered by importing that pack, in a thread, and then by the route its import registered."""

    def __init__(self, app, router):
        self.app = app
        self.router = router
        self._catalog = None
        self._table: list[tuple[re.Pattern, str]] = []

    def resolve(self, method: str, path: str):
        catalog = self.app.catalog
        if catalog is None or not getattr(catalog, "routes", None):
            return None
        if catalog is not self._catalog:
            self._table = self._compile(catalog.routes)
            self._catalog = catalog
        for regex, ref in self._table:
            if not packs.is_imported(ref) and regex.match(path):
                return self._importer(ref), {}
        return None

    @staticmethod
    def _compile(routes: dict) -> list:
        table = []
        for ref, entries in routes.items():
            for kind, path, api_alias in entries:
                paths_ = [_static_path(path)] if kind == "STATIC" else [path] + (["/api" + path] if api_alias else [])
                table += [(re.compile(path_pattern(p)), ref) for p in paths_]
        return table

    def _importer(self, ref: str):
        async def import_then_serve(request) -> Response:
            log.info("importing node pack %s for %s %s", ref, request.method, request.path)
            await asyncio.to_thread(packs.import_pack, ref)  # the pack's routes reach the router meanwhile
            handler, found = self.router.resolve(request.method, request.path)  # no fallback once imported
            if handler is None:
                return error_response(found)
            request.match_info = found
            return await handler(request)

        return import_then_serve


# -- static folders ---------------------------------------------------------------------------------------------

def _static_handler(entry: StaticDef):
    follow = bool(entry.kwargs.get("follow_symlinks", False))

    async def serve(request) -> Response:
        relative = request.match_info.get("filename", "")
        path = paths.safe_join(entry.path, relative)
        if path is None or not os.path.isfile(path):
            return text_response("404: Not Found", 404)
        if not follow and not paths.is_inside(entry.path, path, follow_links=True):
            return text_response("404: Not Found", 404)
        response = FileResponse(path, mimetypes.guess_type(path)[0] or "application/octet-stream")
        response.prepare(request.headers)
        return response

    return serve


# -- the aiohttp bridge -----------------------------------------------------------------------------------------

def _server_error(route: RouteDef) -> Response:
    return json_response({"error": {"type": "server_error", "message": "Internal server error",
                                    "details": f"the node pack route {route.method} {route.path} failed; "
                                               "see the server log", "extra_info": {}},
                          "node_errors": {}}, 500)


def _bridge(route: RouteDef, app):
    async def serve(request) -> Response:
        try:
            await _import_aiohttp()
            from aiohttp import web

            if _is_websocket_upgrade(request):
                return HandedOver(await _websocket_server(route, app), raw_request(request))
            aio_request = await _aiohttp_request(request, app)
        except Exception:
            log.exception("cannot prepare the request for node pack route %s %s", route.method, route.path)
            return _server_error(route)
        writer = aio_request.writer
        task = asyncio.ensure_future(_run_handler(route, aio_request))
        try:
            await asyncio.wait({task, writer.head}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():  # the handler prepared its response and is still writing: stream it
            status, headers = writer.head.result()
            return StreamedResponse(status, headers.get("Content-Type"), _plain_headers(headers), writer, task,
                                    f"{route.method} {route.path}")
        try:
            result = task.result()
        except web.HTTPException as exc:  # raising HTTPNotFound & co. is how aiohttp handlers answer errors
            result = exc
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error("node pack route %s %s raised", route.method, route.path, exc_info=task.exception())
            return _server_error(route)
        try:
            return await _our_response(result, aio_request, request)
        except Exception:
            log.exception("node pack route %s %s returned something that cannot be sent", route.method, route.path)
            return _server_error(route)

    serve.__qualname__ = f"pack_route[{route.method} {route.path}]"
    return serve


async def _run_handler(route: RouteDef, aio_request):
    """The handler, then the end of a response it prepared itself (aiohttp's server does the same)."""
    from aiohttp import web

    try:
        result = route.handler(aio_request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, web.StreamResponse) and result.prepared:
            await result.write_eof()
        return result
    except Exception:
        if aio_request.writer.head.done():  # mid-stream: nobody else will report it
            log.exception("node pack route %s %s failed while streaming", route.method, route.path)
        raise


def _is_websocket_upgrade(request) -> bool:
    return (request.method == "GET" and "websocket" in request.headers.get("upgrade", "").lower()
            and "upgrade" in request.headers.get("connection", "").lower())


async def _websocket_server(route: RouteDef, app):
    """aiohttp's server for one pack route (made once): called, it makes a protocol for one connection."""
    if route.websocket_server is None:
        from aiohttp import web

        async def close_after(request, response) -> None:
            response.force_close()  # the connection came from our server: one request on it, then closed

        aio_app = web.Application(client_max_size=app.settings.max_upload_bytes if app is not None else 1 << 20)
        aio_app.on_response_prepare.append(close_after)
        for path in (route.path, "/api" + route.path):  # the front has already decided which paths it serves
            aio_app.router.add_route(route.method, path, route.handler)
        runner = web.AppRunner(aio_app, handle_signals=False, access_log=None)
        await runner.setup()
        if route.websocket_server is None:
            route.websocket_server = runner.server
    return route.websocket_server


async def _import_aiohttp() -> None:
    if "aiohttp.test_utils" not in sys.modules:
        # 0.2-0.35 s: in a thread, so probes and other requests are answered meanwhile
        await asyncio.to_thread(__import__, "aiohttp.test_utils")


class _Transport:
    """What the aiohttp request reads about the connection."""

    def __init__(self, peer):
        self._peer = peer

    def get_extra_info(self, name: str, default=None):
        if name == "peername":
            return self._peer
        return default

    def is_closing(self) -> bool:
        return False


class _FlowControl:
    """The protocol side of aiohttp's StreamReader: the whole body is already here, nothing to pause."""

    _reading_paused = False
    connected = True

    def pause_reading(self, *args, **kwargs) -> None:
        pass

    def resume_reading(self, *args, **kwargs) -> None:
        pass


async def _aiohttp_request(request, app):
    from aiohttp import streams
    from aiohttp.test_utils import make_mocked_request

    loop = asyncio.get_running_loop()
    body = await asyncio.to_thread(lambda: request.body) if request.body_size > BODY_IN_THREAD else request.body
    payload = streams.StreamReader(_FlowControl(), 1 << 16, loop=loop)
    if body:
        payload.feed_data(body)
    payload.feed_eof()
    max_body = app.settings.max_upload_bytes if app is not None else 100 * 1024 * 1024
    return make_mocked_request(request.method, request.raw_target, dict(request.headers),
                               match_info=dict(request.match_info), writer=stream_writer_class()(),
                               transport=_Transport(request.peer), payload=payload, client_max_size=max_body,
                               loop=loop)


async def _our_response(result, aio_request, request) -> Response:
    from aiohttp import web

    if result is None:
        raise TypeError("the handler returned None instead of a response")
    if isinstance(result, web.FileResponse):
        return _file_response(result, request)
    if not isinstance(result, web.StreamResponse):
        if isinstance(result, web.HTTPException):  # aiohttp versions where exceptions are not responses
            return Response((result.text or "").encode(), result.status, result.content_type,
                            _plain_headers(result.headers))
        raise TypeError(f"the handler returned {type(result).__name__}, not an aiohttp response")
    if isinstance(result, web.WebSocketResponse):
        raise TypeError("a WebSocket handler was called without a WebSocket upgrade request")
    if not result.prepared:
        await result.prepare(aio_request)
    await result.write_eof()
    writer = aio_request.writer
    status, headers = writer.head.result() if writer.head.done() else (result.status, result.headers)
    return Response(writer.collected(), status, headers.get("Content-Type"), _plain_headers(headers))


def _plain_headers(headers) -> list:
    return [(name, value) for name, value in headers.items()
            if name.lower() not in _FRAMING and name.lower() != "content-type"]


def _file_response(result, request) -> Response:
    path = os.fspath(getattr(result, "_path", ""))
    if not path or not os.path.isfile(path):
        return text_response("404: Not Found", 404)
    content_type = result.headers.get("Content-Type") or mimetypes.guess_type(path)[0] or "application/octet-stream"
    headers = [(name, value) for name, value in _plain_headers(result.headers)
               if name.lower() not in ("etag", "last-modified", "accept-ranges", "content-range")]
    response = FileResponse(path, content_type, headers)
    response.prepare(request.headers)
    return response
