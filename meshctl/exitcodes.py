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
    TELEMETRY_FAILED = 6
    CLUSTER_UNREACHABLE = 7
    PERMISSION_DENIED = 8
    CONFLICT = 9
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
    ExitCode.TELEMETRY_FAILED: (
        "Prometheus was unreachable, too slow or refused the query; "
        "the message says which"
    ),
    ExitCode.CLUSTER_UNREACHABLE: (
        "the Kubernetes API server could not be reached, or no kubeconfig "
        "names one; check --kubeconfig and --context"
    ),
    ExitCode.PERMISSION_DENIED: (
        "the Kubernetes API refused a verb (403); the message names the verb, "
        "the resource and the namespace that the Role must grant"
    ),
    ExitCode.CONFLICT: (
        "an object kept changing under meshctl (409) or another field manager "
        "owns its fields; nothing was overwritten, run the command again"
    ),
    ExitCode.INTERRUPTED: "stopped by Ctrl-C or SIGTERM; every started process ended",
}


def epilog() -> str:
    """The exit-code table for ``--help``."""
    return "Exit codes: " + "; ".join(f"{int(c)} {HELP[c]}" for c in ExitCode)
