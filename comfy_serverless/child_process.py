"""Child processes that must not outlive the process that started them, even when it is killed with SIGKILL
(nothing of ours runs then to stop them): the kernel sends them SIGTERM (Linux's PR_SET_PDEATHSIG).

The signal follows the *thread* that started the child: start it from a thread that lives as long as the
process, or from asyncio's default executor, whose threads end only when the event loop closes.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """Runs in the child between fork and exec."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def ends_with_parent():
    """subprocess.Popen's preexec_fn for such a child; None where the platform has no such signal."""
    return _terminate_with_parent if sys.platform.startswith("linux") else None
