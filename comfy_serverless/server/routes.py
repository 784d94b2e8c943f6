"""ComfyUI's core API routes (docs/comfy-api-contract.md §1.3-1.4) plus the health and readiness probes
platforms need."""

from __future__ import annotations

import asyncio
import math
import uuid

from .. import __version__
from ..engine import validation
from .http import Response, json_response
from . import pack_routes
from .files import register_file_routes
from .system import system_stats

CATALOG_WAIT_S = 300
MAX_PROMPT_ID_LENGTH = 256


def _error_body(kind: str, message: str, details: str = "") -> dict:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}


def _bad_request(kind: str, message: str, details: str = "") -> Response:
    return json_response(_error_body(kind, message, details), 400)


def json_body(request, want_object: bool = True):
    """The parsed JSON body, or a 400 Response for unparsable JSON (or, with want_object, a non-object):
    no body a client sends may turn into a 500."""
    try:
        body = request.json()
    except (ValueError, RecursionError) as exc:  # BadJSON from the HTTP layer is a ValueError too
        return _bad_request("invalid_json", "The request body is not valid JSON.", str(exc)[:500])
    if want_object and not isinstance(body, dict):
        return _bad_request("invalid_request", "The request body must be a JSON object.", type(body).__name__)
    return body


def _id_list(body: dict, key: str):
    """body[key] as a list of prompt ids, or a 400 Response."""
    value = body[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return _bad_request("invalid_request", f"'{key}' must be a list of prompt id strings.",
                            type(value).__name__)
    return value


def _number_field(body: dict):
    """The explicit priority, or a 400 Response: NaN or infinity would break the queue's ordering."""
    value = body["number"]
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond float range
        number = math.nan
    if not math.isfinite(number):
        return _bad_request("invalid_prompt", "'number' must be a finite number.", repr(value)[:100])
    return number


def _prompt_id_field(body: dict):
    value = body.get("prompt_id")
    if value is None:
        return str(uuid.uuid4())
    if not isinstance(value, str) or not value or len(value) > MAX_PROMPT_ID_LENGTH:
        return _bad_request("invalid_prompt", f"'prompt_id' must be a non-empty string of at most "
                            f"{MAX_PROMPT_ID_LENGTH} characters.", repr(value)[:100])
    return value


def _client_id_error(value, where: str):
    if value is not None and not isinstance(value, str):
        return _bad_request("invalid_prompt", f"{where} must be a string.", type(value).__name__)
    return None


def _query_int(request, name: str):
    """(value or None, error Response or None) for an optional integer query parameter."""
    raw = request.query.get(name)
    if raw is None:
        return None, None
    try:
        return int(raw), None
    except ValueError:
        return None, _bad_request("invalid_request", f"'{name}' must be an integer.", raw[:100])


def _unknown_nodes(prompt, catalog) -> bool:
    return isinstance(prompt, dict) and any(
        isinstance(node, dict) and isinstance(node.get("class_type"), str) and node["class_type"] not in catalog
        for node in prompt.values())


def register_routes(router, app) -> None:
    async def catalog_or_none():
        if app.catalog is None:
            try:
                await asyncio.wait_for(app.catalogs.ready.wait(), CATALOG_WAIT_S)
            except asyncio.TimeoutError:
                return None
        return app.catalog

    def queue_full() -> bool:
        limit = app.settings.max_queue_size or 0
        return limit > 0 and app.queue.pending_count() >= limit

    async def index(request):
        return json_response({
            "name": "comfy-serverless", "version": __version__,
            "description": "API-only, ComfyUI-compatible workflow server (no web frontend).",
            "api": ["/prompt", "/queue", "/history", "/object_info", "/system_stats", "/ws", "/view",
                    "/upload/image", "/health", "/ready", "/metrics"],
            "frontend": None})

    async def health(request):
        if app.worker.dead_for_good():  # a process that cannot run prompts is dead for a liveness probe
            return json_response({"status": "error", "reasons": app.worker.problems()}, 503)
        return json_response({"status": "ok"})

    async def ready(request):
        reasons = []
        if app.catalog is None:
            reasons.append("node catalogue not loaded yet")
        if queue_full():
            reasons.append(f"queue full ({app.queue.pending_count()} pending)")
        if app.draining:
            reasons.append("shutting down")
        reasons += app.worker.problems()
        if reasons:
            return json_response({"ready": False, "reasons": reasons}, 503)
        return json_response({"ready": True})

    async def get_system_stats(request):
        return json_response(system_stats(app))

    async def features(request):
        return json_response(app.features)

    async def get_prompt(request):
        return json_response({"exec_info": {"queue_remaining": app.queue.remaining()}})

    async def post_prompt(request):
        if app.draining:
            return json_response(_error_body("shutting_down", "The server is shutting down; send the prompt "
                                             "to another instance.", "SIGTERM received"), 503)
        if queue_full():
            return json_response(_error_body("queue_full", "The queue is full; try again later.",
                                             f"{app.queue.pending_count()} prompts pending; --max-queue-size "
                                             f"{app.settings.max_queue_size}"), 503)
        body = json_body(request, want_object=False)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict):
            return _bad_request("invalid_prompt", "The request body must be a JSON object.", type(body).__name__)
        body = pack_routes.on_prompt(app, body)  # node packs' PromptServer.add_on_prompt_handler hooks
        if not isinstance(body, dict):
            return _bad_request("invalid_prompt", "An on-prompt handler of a node pack returned no JSON object.",
                                type(body).__name__)
        number = _number_field(body) if "number" in body else None
        if isinstance(number, Response):
            return number
        prompt_id = _prompt_id_field(body)
        if isinstance(prompt_id, Response):
            return prompt_id
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return _bad_request("invalid_prompt", "extra_data must be a JSON object.", "")
        error = (_client_id_error(body.get("client_id"), "client_id")
                 or _client_id_error(extra_data.get("client_id"), "extra_data.client_id"))
        if error is not None:
            return error
        if number is None:
            number = app.prompt_counter
            if body.get("front"):
                number = -number
            app.prompt_counter += 1
        if "prompt" not in body:
            return json_response(_error_body("no_prompt", "No prompt provided", "No prompt provided"), 400)
        prompt = body["prompt"]
        catalog = await catalog_or_none()
        if catalog is None:
            return json_response(_error_body("not_ready", "The node catalogue is not loaded yet.", ""), 503)
        if app.backend is not None and not app.backend.catalog_live and _unknown_nodes(prompt, catalog):
            # nodes the snapshot does not know may be the backend's (a pack added since): ask the backend itself
            await app.backend.wait_catalog(app.settings.comfyui_boot_timeout)
            catalog = app.catalog
        partial = body.get("partial_execution_targets")
        if validation.runs_node_code(prompt, catalog):
            result = await asyncio.to_thread(validation.validate_prompt, prompt, catalog, app.folders, partial)
        else:
            result = validation.validate_prompt(prompt, catalog, app.folders, partial)
        if not result.ok:
            return json_response({"error": result.error, "node_errors": result.node_errors}, 400)
        if app.backend is not None and catalog.needs_backend(prompt):
            missing = catalog.missing_on_backend(prompt)
            if missing:
                node_id, class_type = missing[0]
                return _bad_request("invalid_prompt", f"Cannot execute because node {class_type} exists only in "
                                    "this server, and other nodes of the prompt exist only on the ComfyUI backend: "
                                    "a prompt runs on one engine.", f"Node ID '#{node_id}'")
        if app.draining:  # SIGTERM arrived while validating: drain() no longer looks at new items
            return json_response(_error_body("shutting_down", "The server is shutting down; send the prompt "
                                             "to another instance.", "SIGTERM received"), 503)
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not app.queue.put_new([number, prompt_id, prompt, extra_data, result.outputs]):
            return _bad_request("duplicate_prompt_id", "A prompt with this prompt_id is already queued, running "
                                "or in the history.", prompt_id)
        if app.backend is not None and catalog.needs_backend(prompt):
            app.backend.start()  # lazy boot: the first prompt that needs it (it waits in the queue meanwhile)
        return json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})

    async def object_info(request):
        catalog = await catalog_or_none()
        if catalog is None:
            return json_response(_error_body("not_ready", "The node catalogue is not loaded yet."), 503)
        only = request.match_info.get("node_class")
        return Response(catalog.object_info_json(app.folders, only), 200, "application/json; charset=utf-8")

    async def get_history(request):
        # ComfyUI answers non-integers with a 500; here no bad input gets a 500 (issue #7).
        max_items, error = _query_int(request, "max_items")
        offset, error = (None, error) if error else _query_int(request, "offset")
        if error is not None:
            return error
        return json_response(app.queue.history(max_items, offset or 0))

    async def get_history_entry(request):
        return json_response(app.queue.history_entry(request.match_info["prompt_id"]))

    def clear_and_delete(request, clear, delete) -> Response:
        """`{"clear": bool, "delete": [prompt_id, ...]}`, as POST /history and POST /queue take it."""
        body = json_body(request)
        if isinstance(body, Response):
            return body
        ids = _id_list(body, "delete") if "delete" in body else []
        if isinstance(ids, Response):
            return ids
        if body.get("clear"):
            clear()
        if ids:
            delete(ids)
        return Response()

    async def post_history(request):
        return clear_and_delete(request, app.queue.clear_history, app.queue.delete_history)

    async def get_queue(request):
        return json_response({"queue_running": app.queue.running(), "queue_pending": app.queue.pending()})

    async def post_queue(request):
        return clear_and_delete(request, app.queue.wipe, app.queue.delete)

    async def interrupt(request):
        body = json_body(request, want_object=False) if request.body else {}  # bad bodies: global interrupt
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        app.request_interrupt(prompt_id)
        return Response()

    async def free(request):
        body = json_body(request)
        if isinstance(body, Response):
            return body
        if body.get("unload_models"):
            app.queue.set_flag("unload_models", True)
        if body.get("free_memory"):
            app.queue.set_flag("free_memory", True)
        if app.backend is not None:
            await app.backend.free({k: bool(body.get(k)) for k in ("unload_models", "free_memory")})
        return Response()

    async def websocket_without_upgrade(request):
        return Response(b"No WebSocket UPGRADE hdr: None\n Can \"Upgrade\" only to \"WebSocket\".", 400,
                        "text/plain; charset=utf-8")

    async def metrics(request):
        body = app.metrics.render(app.queue.pending_count(), len(app.queue.running()), app.context,
                                  worker_up=app.worker.up, worker_restarts=app.worker.restarts,
                                  seconds_since_progress=app.worker.seconds_since_progress(),
                                  backend=app.backend.describe() if app.backend is not None else None)
        return Response(body, 200, "text/plain; version=0.0.4; charset=utf-8")

    async def extensions(request):
        return json_response([])  # no web frontend, so no frontend extensions

    router.add("GET", "/", index)
    router.add("GET", "/ws", websocket_without_upgrade)
    router.add("GET", "/health", health, api_alias=False)
    router.add("GET", "/ready", ready, api_alias=False)
    router.add("GET", "/metrics", metrics, api_alias=False)
    router.add("GET", "/system_stats", get_system_stats)
    router.add("GET", "/features", features)
    router.add("GET", "/prompt", get_prompt)
    router.add("POST", "/prompt", post_prompt)
    router.add("GET", "/object_info", object_info)
    router.add("GET", "/object_info/{node_class}", object_info)
    router.add("GET", "/history", get_history)
    router.add("GET", "/history/{prompt_id}", get_history_entry)
    router.add("POST", "/history", post_history)
    router.add("GET", "/queue", get_queue)
    router.add("POST", "/queue", post_queue)
    router.add("POST", "/interrupt", interrupt)
    router.add("POST", "/free", free)
    router.add("GET", "/extensions", extensions)
    register_file_routes(router, app)
