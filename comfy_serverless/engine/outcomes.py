"""History entries for prompts that ended outside any node's own error handling, and how to read an entry."""

from __future__ import annotations

from .executor import now_ms


def failure_entry(prompt_id: str, message: str, exception_type: str, tb=(), node_id=None, node_type=None) -> dict:
    """ComfyUI's history shape for a prompt that failed outside any node's own error handling."""
    data: dict = {"prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": [],
            "exception_message": message, "exception_type": exception_type, "traceback": list(tb),
            "current_inputs": {}, "current_outputs": [], "timestamp": now_ms()}
    return {"outputs": {}, "meta": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", data]]}}


def interrupted_entry(prompt_id: str) -> dict:
    data: dict = {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
                  "timestamp": now_ms()}
    return {"outputs": {}, "meta": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_interrupted", data]]}}


def final_data(entry: dict) -> dict:
    """The data of an entry's last message (what its final WebSocket message carries)."""
    return entry["status"]["messages"][-1][1]


def outcome(entry: dict) -> str:
    """success, interrupted or error."""
    messages = entry.get("status", {}).get("messages") or []
    last = messages[-1][0] if messages else ""
    return {"execution_success": "success", "execution_interrupted": "interrupted"}.get(last, "error")


def client_of(item: list) -> str | None:
    """The client id a queue item's messages go to, if any."""
    extra = item[3] if len(item) > 3 else None
    client = extra.get("client_id") if isinstance(extra, dict) else None
    return client if isinstance(client, str) else None
