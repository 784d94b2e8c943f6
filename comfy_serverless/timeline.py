"""Monotonic timestamps of the start-up stages, shown in /system_stats and the log.

Times are seconds since the process started (taken from the kernel's process start time when available, so
interpreter start-up is counted too).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def _process_start_monotonic() -> float:
    """time.monotonic() value at which the kernel started this process (Linux), else now."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22: starttime, in clock ticks since boot
        since_boot = start_ticks / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        # CLOCK_MONOTONIC and /proc/uptime both count from boot (uptime includes suspend; close enough here).
        return time.monotonic() - (uptime - since_boot)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


PROCESS_START = _process_start_monotonic()


def mark(stage: str) -> float:
    """Records a stage of the current server the first time it happens; returns seconds since process start."""
    from . import context

    return context.current().timeline.mark(stage)


def stages() -> dict[str, float]:
    from . import context

    return context.current().timeline.stages()
