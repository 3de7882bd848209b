"""The round API: how an FL server asks the controller to arm a round.

``POST /v1/rounds/arm`` with ``{"server_round": r, "per_round": k}`` answers
``{"server_round": r, "slots": [1, ...], "routing_version": "...",
"slot_config": {"1": {"local-steps-factor": 1.5}}}`` once the routes for the
round are served (``slot_config`` holds the per-slot training settings the
policy asked for, often none).  ``POST /v1/rounds/feedback`` with
``{"server_round": r, "outcomes": [{"slot": 1, "status": "ok", ...}]}`` hands
the controller the round's per-slot outcomes.  ``GET /healthz`` answers 200;
``GET /metrics`` serves the controller's own metrics to Prometheus.

When the server has a token, both POST endpoints require it as
``Authorization: Bearer <token>`` (compared in constant time) and answer 401
without it; ``/healthz`` and ``/metrics`` stay open.  The token comes from
``MESHCTL_ROUND_API_TOKEN_FILE`` (a file, as a Kubernetes Secret mounts it) or
``MESHCTL_ROUND_API_TOKEN``; see :func:`token_from_environment`.

Stopping the server also ends its kept-alive connections, once their call in
progress is answered, so a server started again on the same port (over a
restarted controller) gets every later call, never a stale connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import os
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from meshctl.controller import metrics
from meshctl.controller.cycle import ArmError, Controller
from meshctl.types import ArmedRound, SlotOutcome

log = logging.getLogger("meshctl.roundapi")

ARM_PATH = "/v1/rounds/arm"
FEEDBACK_PATH = "/v1/rounds/feedback"
METRICS_PATH = "/metrics"
MAX_BODY_BYTES = 1024 * 1024
TOKEN_ENV = "MESHCTL_ROUND_API_TOKEN"
TOKEN_FILE_ENV = "MESHCTL_ROUND_API_TOKEN_FILE"
# How long ``stop`` waits for calls in progress before closing their sockets.
STOP_GRACE_S = 5.0


class RoundAPIError(RuntimeError):
    """The round API refused a call or could not be reached."""


class BadRequest(ValueError):
    """A call whose body does not hold what the endpoint needs."""


class TokenError(RoundAPIError, ValueError):
    """The round API's token file cannot be read or is empty."""


def token_from_environment(environ: dict[str, str] | None = None) -> str | None:
    """The round API's shared token: the file ``MESHCTL_ROUND_API_TOKEN_FILE``
    names, else ``MESHCTL_ROUND_API_TOKEN``, else None (no authentication).

    Raises :class:`TokenError` naming the file when it cannot be read or is
    empty: a server must not start open by mistake.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(TOKEN_FILE_ENV)
    if path:
        what = f"round API token file {path} ({TOKEN_FILE_ENV})"
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"{what}: cannot read: {exc}") from exc
        if not token:
            raise TokenError(f"{what} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


def _authorized(header: str | None, token: str | None) -> bool:
    """True when no token is required or ``header`` carries it (constant time)."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def _outcome_from_json(server_round: int, item: object) -> SlotOutcome:
    if not isinstance(item, dict):
        raise BadRequest("each outcome must be an object")
    known = {f.name for f in dataclasses.fields(SlotOutcome)} - {"server_round"}
    unknown = set(item) - known
    if unknown:
        raise BadRequest(f"unknown outcome fields: {sorted(unknown)}")
    try:
        return SlotOutcome(server_round=server_round, **item)
    except TypeError as exc:
        raise BadRequest(f"outcome: {exc}") from exc


def _int_field(body: dict, name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer")
    return value


class RoundAPIServer:
    """Serves the round API of ``controller`` on ``host:port`` in a thread.

    With a ``token``, the POST endpoints answer 401 unless the call carries it.
    """

    def __init__(
        self,
        controller: Controller,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
    ):
        self._controller = controller
        self._token = token
        # Open connections, so that stop() can end the kept-alive ones.
        self._connections: set[socket.socket] = set()
        self._connections_changed = threading.Condition()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="round-api", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RoundAPIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, then end the open connections.

        A connection waiting for its next call is ended at once; one with a
        call in progress is ended once answered (at most ``STOP_GRACE_S``).
        """
        self._server.shutdown()
        self._server.server_close()
        with self._connections_changed:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
            deadline = time.monotonic() + STOP_GRACE_S
            while self._connections and time.monotonic() < deadline:
                self._connections_changed.wait(deadline - time.monotonic())
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _arm(self, body: dict) -> dict:
        armed = self._controller.arm(
            _int_field(body, "server_round"), _int_field(body, "per_round")
        )
        return {
            "server_round": armed.server_round,
            "slots": list(armed.slots),
            "routing_version": armed.routing_version,
            "slot_config": {str(k): dict(v) for k, v in armed.slot_config.items()},
        }

    def _feedback(self, body: dict) -> dict:
        server_round = _int_field(body, "server_round")
        outcomes = body.get("outcomes")
        if not isinstance(outcomes, list):
            raise BadRequest("'outcomes' must be a list")
        parsed = [_outcome_from_json(server_round, item) for item in outcomes]
        return {"recorded": len(self._controller.record_feedback(server_round, parsed))}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        routes = {ARM_PATH: self._arm, FEEDBACK_PATH: self._feedback}
        controller = self._controller
        token = self._token
        connections, changed = self._connections, self._connections_changed

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with changed:
                    connections.add(self.connection)

            def finish(self) -> None:
                with changed:
                    connections.discard(self.connection)
                    changed.notify_all()
                super().finish()

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path == METRICS_PATH:
                    body = controller.metrics.exposition()
                    self.send_response(HTTPStatus.OK)
                    self.send_header("content-type", metrics.CONTENT_TYPE)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                status = (
                    HTTPStatus.OK if self.path == "/healthz" else HTTPStatus.NOT_FOUND
                )
                self._send(status, {"status": status.phrase})

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                endpoint = routes.get(self.path)
                if endpoint is None:
                    self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
                    return
                if not _authorized(self.headers.get("authorization"), token):
                    log.warning(
                        "refused %s from %s: no valid bearer token",
                        self.path,
                        self.address_string(),
                    )
                    self._discard_body()
                    self._send(
                        HTTPStatus.UNAUTHORIZED,
                        {"error": "a valid bearer token is required"},
                        {"www-authenticate": 'Bearer realm="meshctl round API"'},
                    )
                    return
                try:
                    self._send(HTTPStatus.OK, endpoint(self._body()))
                except BadRequest as exc:
                    self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                except ArmError as exc:
                    log.error("%s", exc)
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

            def _body(self) -> dict:
                try:
                    length = int(self.headers.get("content-length") or 0)
                except ValueError as exc:
                    raise BadRequest("content-length is not a number") from exc
                if length < 0 or length > MAX_BODY_BYTES:
                    raise BadRequest(f"body of {length} bytes is too large")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise BadRequest(f"body is not JSON: {exc}") from exc
                if not isinstance(body, dict):
                    raise BadRequest("body must be a JSON object")
                return body

            def _discard_body(self) -> None:
                """Read a refused call's body (when small) to keep the connection."""
                try:
                    length = int(self.headers.get("content-length") or 0)
                except ValueError:
                    length = 0
                if 0 < length <= MAX_BODY_BYTES:
                    self.rfile.read(length)
                elif length:
                    self.close_connection = True

            def _send(
                self, status: HTTPStatus, payload: dict, headers: dict | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("%s %s", self.address_string(), format % args)

        return Handler


class RoundAPIClient:
    """What an FL server uses to talk to the controller's round API."""

    def __init__(
        self,
        url: str,
        *,
        per_round: int,
        timeout_s: float = 120.0,
        token: str | None = None,
    ) -> None:
        """``token`` defaults to :func:`token_from_environment`."""
        token = token if token is not None else token_from_environment()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)
        self.per_round = per_round

    def arm(self, server_round: int) -> ArmedRound:
        body = self._post(
            ARM_PATH, {"server_round": server_round, "per_round": self.per_round}
        )
        return ArmedRound(
            server_round=body["server_round"],
            slots=tuple(body["slots"]),
            routing_version=body["routing_version"],
            slot_config={int(k): v for k, v in (body.get("slot_config") or {}).items()},
        )

    def report(self, server_round: int, outcomes: list[SlotOutcome]) -> None:
        items = [
            {k: v for k, v in dataclasses.asdict(o).items() if k != "server_round"}
            for o in outcomes
        ]
        self._post(FEEDBACK_PATH, {"server_round": server_round, "outcomes": items})

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, payload: dict) -> dict:
        try:
            response = self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise RoundAPIError(f"round API at {self._http.base_url}: {exc}") from exc
        if response.status_code != 200:
            raise RoundAPIError(
                f"round API {path} answered {response.status_code}: "
                f"{response.text[:300]}"
            )
        return response.json()
