"""ComfyUI's core API routes (contract 1.3-1.4) plus the health and readiness probes platforms need."""

from __future__ import annotations

import asyncio
import uuid

from .. import __version__
from ..engine import validation
from .http import Response, json_response
from .files import register_file_routes
from .system import system_stats

CATALOG_WAIT_S = 300


def _error_body(kind: str, message: str, details: str = "") -> dict:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}


def register_routes(router, app) -> None:
    async def catalog_or_none():
        if app.catalog is None:
            try:
                await asyncio.wait_for(app.catalog_ready.wait(), CATALOG_WAIT_S)
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
        return json_response({"status": "ok"})

    async def ready(request):
        reasons = []
        if app.catalog is None:
            reasons.append("node catalogue not loaded yet")
        if queue_full():
            reasons.append(f"queue full ({app.queue.pending_count()} pending)")
        if app.draining:
            reasons.append("shutting down")
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
        body = request.json()  # unparsable -> 500, as ComfyUI
        if not isinstance(body, dict):
            return json_response(_error_body("invalid_prompt", "The request body must be a JSON object.",
                                             type(body).__name__), 400)
        if "number" in body:
            number = float(body["number"])
        else:
            number = app.prompt_counter
            if body.get("front"):
                number = -number
            app.prompt_counter += 1
        if "prompt" not in body:
            return json_response(_error_body("no_prompt", "No prompt provided", "No prompt provided"), 400)
        prompt = body["prompt"]
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return json_response(_error_body("invalid_prompt", "extra_data must be a JSON object.", ""), 400)
        catalog = await catalog_or_none()
        if catalog is None:
            return json_response(_error_body("not_ready", "The node catalogue is not loaded yet.", ""), 503)
        partial = body.get("partial_execution_targets")
        if validation.runs_node_code(prompt, catalog):
            result = await asyncio.to_thread(validation.validate_prompt, prompt, catalog, app.folders, partial)
        else:
            result = validation.validate_prompt(prompt, catalog, app.folders, partial)
        if not result.ok:
            return json_response({"error": result.error, "node_errors": result.node_errors}, 400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        app.queue.put([number, prompt_id, prompt, extra_data, result.outputs])
        return json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})

    async def object_info(request):
        catalog = await catalog_or_none()
        if catalog is None:
            return json_response(_error_body("not_ready", "The node catalogue is not loaded yet."), 503)
        only = request.match_info.get("node_class")
        return Response(catalog.object_info_json(app.folders, only), 200, "application/json; charset=utf-8")

    async def get_history(request):
        max_items = request.query.get("max_items")
        offset = int(request.query.get("offset", 0))  # non-integers -> 500, as ComfyUI
        return json_response(app.queue.history(int(max_items) if max_items is not None else None, offset))

    async def get_history_entry(request):
        return json_response(app.queue.history_entry(request.match_info["prompt_id"]))

    async def post_history(request):
        body = request.json()
        if body.get("clear"):
            app.queue.clear_history()
        if "delete" in body:
            app.queue.delete_history(body["delete"])
        return Response()

    async def get_queue(request):
        return json_response({"queue_running": app.queue.running(), "queue_pending": app.queue.pending()})

    async def post_queue(request):
        body = request.json()
        if body.get("clear"):
            app.queue.wipe()
        if "delete" in body:
            app.queue.delete(body["delete"])
        return Response()

    async def interrupt(request):
        try:
            body = request.json() if request.body else {}
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        app.request_interrupt(prompt_id)
        return Response()

    async def free(request):
        body = request.json()
        if body.get("unload_models"):
            app.queue.set_flag("unload_models", True)
        if body.get("free_memory"):
            app.queue.set_flag("free_memory", True)
        return Response()

    async def websocket_without_upgrade(request):
        return Response(b"No WebSocket UPGRADE hdr: None\n Can \"Upgrade\" only to \"WebSocket\".", 400,
                        "text/plain; charset=utf-8")

    async def metrics(request):
        body = app.metrics.render(app.queue.pending_count(), len(app.queue.running()))
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
