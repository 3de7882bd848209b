"""The FL server role in a cluster: a ServerApp over the mesh's routing slots.

``meshctl server`` loads a Flower ``ServerApp`` by reference (``module:attr``),
gives it a :class:`~meshctl.flower.grid.MeshGrid` that asks the controller's
round API to arm each round and sends every message to the FL clients'
Service, and serves ``/healthz`` for the kubelet's probes while it runs.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from flwr.app import Context, RecordDict
from flwr.serverapp import ServerApp

from meshctl import protocol
from meshctl.flower.grid import DEFAULT_MAX_REPLY_BYTES, ArmFn, MeshGrid, ReportFn

log = logging.getLogger("meshctl.server")

RunConfig = dict[str, bool | float | int | str]


class ServerRoleError(RuntimeError):
    """The server role cannot start: a bad app reference or no controller."""


@dataclass(frozen=True)
class ServerSettings:
    """Where the server sends messages and how long a round may take."""

    app_ref: str
    mesh_url: str
    deadline_s: float = 600.0
    health_port: int = 8081
    run_config: RunConfig = field(default_factory=dict)
    # A larger reply is refused (an error reply for its slot), never read whole.
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES


def parse_run_config(items: Sequence[str]) -> RunConfig:
    """``key=value`` items as a run config: ints, floats and booleans typed."""
    config: RunConfig = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"run config {item!r} is not key=value")
        config[key.strip()] = _typed(text.strip())
    return config


def _typed(text: str) -> bool | float | int | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def check_app_ref(app_ref: str) -> tuple[str, str]:
    """``module:attribute`` split in two, or ServerRoleError naming the text."""
    module_name, sep, attribute = app_ref.partition(":")
    if not sep or not module_name or not attribute:
        raise ServerRoleError(f"--app {app_ref!r}: expected module:attribute")
    return module_name, attribute


def load_app(app_ref: str) -> ServerApp:
    """The ServerApp that ``module:attribute`` names."""
    module_name, attribute = check_app_ref(app_ref)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ServerRoleError(f"--app {app_ref!r}: cannot import: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, ServerApp):
        raise ServerRoleError(f"--app {app_ref!r}: not a flwr ServerApp")
    return app


def check_controller(url: str, timeout_s: float = 5.0) -> None:
    """Fail now, naming the URL, if the controller's round API does not answer."""
    health = url.rstrip("/") + protocol.HEALTH_PATH
    try:
        response = httpx.get(health, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ServerRoleError(
            f"the controller's round API at {url} is unreachable ({exc}); "
            "check --controller and that the controller is running"
        ) from exc
    if response.status_code != 200:
        raise ServerRoleError(
            f"the controller at {health} answered {response.status_code}"
        )


def run(app: ServerApp, settings: ServerSettings, *, arm: ArmFn, report: ReportFn):
    """Run ``app`` to its end over the mesh, serving /healthz meanwhile."""
    health = _HealthServer(settings.health_port) if settings.health_port else None
    grid = MeshGrid(
        mesh_url=settings.mesh_url,
        arm=arm,
        report=report,
        deadline_s=settings.deadline_s,
        max_reply_bytes=settings.max_reply_bytes,
    )
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(settings.run_config),
    )
    try:
        log.info("running %s over %s", settings.app_ref, settings.mesh_url)
        app(grid, context)
    finally:
        grid.close()
        if health is not None:
            health.stop()


class _HealthServer:
    """``/healthz`` on all interfaces, in a thread."""

    def __init__(self, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                ok = self.path == protocol.HEALTH_PATH
                self.send_response(HTTPStatus.OK if ok else HTTPStatus.NOT_FOUND)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
