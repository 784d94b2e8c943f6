"""`GET /metrics` in the Prometheus text format (version 0.0.4), rendered here.

Why not prometheus_client: measured on this machine, `import prometheus_client` takes 84-103 ms, about half
the ready-time budget; the few metrics below need a counter, a histogram and a renderer.
"""

from __future__ import annotations

import threading

from .. import memory, timeline
from .system import rss_bytes

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

    def render(self, pending: int, running: int) -> bytes:
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
                   [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.prompts.items())])
            cumulative = list(zip(DURATION_BUCKETS, self.duration_buckets))
            samples = [(f'_bucket{{le="{_number(b)}"}}', c) for b, c in cumulative]
            samples += [('_bucket{le="+Inf"}', self.duration_count), ("_sum", self.duration_sum),
                        ("_count", self.duration_count)]
            lines.append("# HELP comfy_prompt_duration_seconds Time from a prompt's start to its end.")
            lines.append("# TYPE comfy_prompt_duration_seconds histogram")
            lines += [f"comfy_prompt_duration_seconds{suffix} {_number(v)}" for suffix, v in samples]
            metric("comfy_startup_stage_seconds", "gauge", "Seconds from process start to each start-up stage.",
                   [(f'{{stage="{k}"}}', v) for k, v in timeline.stages().items()])
            metric("comfy_model_load_seconds", "gauge", "Seconds the last load of each model took.",
                   [(f'{{model="{_escape(k)}"}}', v) for k, v in sorted(memory.model_load_seconds().items())])
        metric("comfy_process_resident_memory_bytes", "gauge", "Resident set size of the server process.",
               [("", rss_bytes())])
        return ("\n".join(lines) + "\n").encode()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
