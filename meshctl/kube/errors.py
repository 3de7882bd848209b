"""What can go wrong when meshctl talks to the API server, one class per answer.

Each error keeps the HTTP status and the server's reason, names the verb, the
resource and the namespace, and trims the server's message so a large body
never floods a log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Target:
    """What a request acted on: ``patch destinationrules.networking.istio.io fl/x``."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.verb} {self.resource}" + (f" {where}" if where else "")


class KubeError(Exception):
    """The API server refused a request or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        target: Target | None = None,
        status: int = 0,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.target = target
        self.status = status
        self.reason = reason


class Unreachable(KubeError):
    """No answer from the API server (connection refused, timeout, TLS)."""


class Forbidden(KubeError):
    """403: the identity lacks a verb on a resource; the Role must grant it."""


class NotFound(KubeError):
    """404: the object, or the resource type itself, does not exist."""


class Conflict(KubeError):
    """409: a stale resource version, a field another manager owns, or a name
    already taken."""


class Invalid(KubeError):
    """400 or 422: the server refused the object's content."""


_BY_STATUS: dict[int, type[KubeError]] = {
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    400: Invalid,
    422: Invalid,
}


def from_response(status: int, body: bytes | str | None, target: Target) -> KubeError:
    """The error for a failed answer; its message says what to do next."""
    status_obj = _status_object(body)
    reason = str(status_obj.get("reason") or "")
    server_message = _trim(str(status_obj.get("message") or body or "").strip())
    cls = _BY_STATUS.get(status, KubeError)
    if cls is Forbidden:
        where = f" in namespace {target.namespace}" if target.namespace else ""
        message = (
            f"permission denied: cannot {target.verb} {target.resource}{where}; "
            f"grant the verb {target.verb!r} on {target.resource!r} in the "
            f"identity's Role (server said: {server_message})"
        )
    else:
        message = f"{target}: {status} {reason or 'error'}: {server_message}"
    return cls(message, target=target, status=status, reason=reason)


def _status_object(body: bytes | str | None) -> dict:
    """The ``Status`` object of an error body, or an empty dict."""
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _trim(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."
