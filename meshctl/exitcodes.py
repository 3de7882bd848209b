"""The exit codes of ``meshctl``, each with the help text users see."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    DATA_MISSING = 3
    INVALID = 4
    MESH_FAILED = 5
    INTERRUPTED = 130


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "an unexpected failure; the message says what happened",
    ExitCode.USAGE: "the command line is wrong (unknown option or bad value)",
    ExitCode.DATA_MISSING: (
        "a dataset file is missing or unreadable; `meshctl data fetch` gets it"
    ),
    ExitCode.INVALID: "an input file or object is invalid; each problem is listed",
    ExitCode.MESH_FAILED: (
        "the local mesh (Envoy or a client service) did not start or stopped"
    ),
    ExitCode.INTERRUPTED: "stopped by Ctrl-C or SIGTERM; every started process ended",
}


def epilog() -> str:
    """The exit-code table for ``--help``."""
    return "Exit codes: " + "; ".join(f"{int(c)} {HELP[c]}" for c in ExitCode)
