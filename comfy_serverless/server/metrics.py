"""`GET /metrics` in the Prometheus text format (version 0.0.4), rendered here.

Why not prometheus_client: measured on this machine, `import prometheus_client` takes 84-103 ms, about half
the ready-time budget; the few metrics below need a counter, a histogram and a renderer.
"""

from __future__ import annotations

import math
import threading

from .system import rss_bytes

BACKEND_STATES = ("not started", "booting", "up", "restarting", "failed", "stopped")
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.prompts: dict[str, int] = {"success": 0, "error": 0, "interrupted": 0}
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0

    def prompt_finished(self, outcome: str, seconds: float) -> None:
        with self._lock:
            self.prompts[outcome] = self.prompts.get(outcome, 0) + 1
            self.duration_sum += seconds
            self.duration_count += 1
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    self.duration_buckets[i] += 1

    def render(self, pending: int, running: int, server_context, worker_up: bool = True,
               worker_restarts: int = 0, seconds_since_progress: float = 0.0, backend: dict | None = None) -> bytes:
        """The exposition text; stages and model loads come from `server_context` (one server's state)."""
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_number(value)}")

        with self._lock:
            metric("comfy_queue_pending", "gauge", "Prompts waiting in the queue.", [("", pending)])
            metric("comfy_queue_running", "gauge", "Prompts being executed.", [("", running)])
            metric("comfy_prompts_total", "counter", "Finished prompts by outcome.",
                   [(_labels(outcome=k), v) for k, v in sorted(self.prompts.items())])
            cumulative = list(zip(DURATION_BUCKETS, self.duration_buckets))
            samples = [("_bucket" + _labels(le=_number(b)), c) for b, c in cumulative]
            samples += [('_bucket{le="+Inf"}', self.duration_count), ("_sum", self.duration_sum),
                        ("_count", self.duration_count)]
            lines.append("# HELP comfy_prompt_duration_seconds Time from a prompt's start to its end.")
            lines.append("# TYPE comfy_prompt_duration_seconds histogram")
            lines += [f"comfy_prompt_duration_seconds{suffix} {_number(v)}" for suffix, v in samples]
            metric("comfy_startup_stage_seconds", "gauge", "Seconds from process start to each start-up stage.",
                   [(_labels(stage=k), v) for k, v in server_context.timeline.stages().items()])
            metric("comfy_model_load_seconds", "gauge", "Seconds the last load of each model took.",
                   [(_labels(model=k), v) for k, v in sorted(server_context.model_load_seconds.items())])
        metric("comfy_worker_up", "gauge", "1 while the prompt worker thread is alive.", [("", int(worker_up))])
        metric("comfy_worker_restarts_total", "counter", "Times the supervisor restarted a dead prompt worker.",
               [("", worker_restarts)])
        metric("comfy_worker_seconds_since_progress", "gauge", "Seconds since the prompt worker last showed "
               "life (a loop tick when idle, an engine event while running a prompt).",
               [("", seconds_since_progress)])
        if backend is not None:
            metric("comfy_backend_up", "gauge", "1 while the ComfyUI backend is up and connected.",
                   [("", int(backend["state"] == "up"))])
            metric("comfy_backend_state", "gauge", "The ComfyUI backend's state (1 for the current one).",
                   [(_labels(state=state), int(backend["state"] == state)) for state in BACKEND_STATES])
            metric("comfy_backend_boot_seconds", "gauge", "Seconds the last ComfyUI backend boot took (until it "
                   "answered).", [("", backend["boot_seconds"] if backend["boot_seconds"] is not None else math.nan)])
            metric("comfy_backend_restarts_total", "counter", "Times the ComfyUI backend was restarted after it "
                   "died.", [("", backend["restarts"])])
            metric("comfy_backend_prompts_total", "counter", "Prompts handed to the ComfyUI backend.",
                   [("", backend["prompts"])])
        metric("comfy_process_resident_memory_bytes", "gauge", "Resident set size of the server process.",
               [("", rss_bytes())])
        return ("\n".join(lines) + "\n").encode()


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


def _labels(**labels) -> str:
    """`{name="value",...}` with every value escaped: a model or stage name may hold any character."""
    return "{" + ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items()) + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
