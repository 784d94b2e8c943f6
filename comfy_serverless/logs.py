"""Logging set-up: plain text (default) or one JSON object per line (`--log-format json`) with prompt ids."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

# The prompt being executed by this thread/task; log records carry it as `prompt_id`.
current_prompt: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_prompt", default=None)


class _PromptIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "prompt_id"):
            record.prompt_id = current_prompt.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "prompt_id", None):
            entry["prompt_id"] = record.prompt_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(settings) -> None:
    handler = logging.StreamHandler(sys.stdout if settings.log_stdout else sys.stderr)
    handler.addFilter(_PromptIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, settings.verbose, logging.INFO))
