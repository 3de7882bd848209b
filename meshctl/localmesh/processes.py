"""How the local mesh starts its processes: Envoy and the client services.

Each child runs in a session of its own, so that a Ctrl-C in the terminal reaches
only the parent, which then stops its children in order.  On Linux each child is
also told to receive SIGTERM when the thread that started it dies, so that a
parent killed outright (SIGKILL, an OOM kill) leaves no process behind.  The
thread, not the process: start children from a thread that lives as long as they
should.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1

log = logging.getLogger("meshctl.processes")


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_options() -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` that start a managed child.

    The child is sent SIGTERM when the *thread* that started it ends (that is
    how Linux's parent-death signal works), so start long-lived children from
    a thread that lives as long as they should.
    """
    preexec: Callable[[], None] | None = (
        _die_with_parent if sys.platform.startswith("linux") else None
    )
    return {"start_new_session": True, "preexec_fn": preexec}


def stop(process: subprocess.Popen | None, name: str, grace_s: float = 5.0) -> None:
    """Stop a child by its pid: SIGTERM, then SIGKILL after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning(
            "%s pid %s ignored SIGTERM for %.1f s; killing it",
            name,
            process.pid,
            grace_s,
        )
        process.kill()
        process.wait(timeout=grace_s)
    log.info("%s pid %s stopped", name, process.pid)
