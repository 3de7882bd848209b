"""An HTTP service that hosts one Flower ``ClientApp``: one FL client, one process.

The service is what a pod runs in a cluster and what a local process runs in the
embedded mesh.  It knows nothing of slots or selection: the mesh decides which
requests reach it.  Each request carries one serialised ``Message``; the reply
carries the ``ClientApp``'s reply ``Message``.  A failure of the app becomes an
HTTP 500 with a short reason, so that the mesh's telemetry sees it.

Run it as ``python -m meshctl.flower.clientservice --app MODULE:ATTR ...``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    generate_latest,
)

from meshctl import protocol
from meshctl.flower import internals

log = logging.getLogger("meshctl.clientservice")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
METRICS_PATH = "/metrics"


class FLMetrics:
    """The FL metrics a client service exports on ``/metrics`` for Prometheus.

    Each gauge holds the value of the last training reply: the loss and the
    examples it reports, and the seconds the ``ClientApp`` took to train.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.train_loss = Gauge(
            "meshctl_fl_train_loss",
            "Training loss in the client's last train reply.",
            registry=self.registry,
        )
        self.train_examples = Gauge(
            "meshctl_fl_train_examples",
            "Examples the client trained on in its last train reply.",
            registry=self.registry,
        )
        self.local_train_seconds = Gauge(
            "meshctl_fl_local_train_seconds",
            "Seconds the ClientApp took for the last train message.",
            registry=self.registry,
        )
        # Before the first train reply there is no value: NaN, never a number.
        for gauge in (self.train_loss, self.train_examples, self.local_train_seconds):
            gauge.set(math.nan)

    def train_replied(self, reply_metrics: Mapping[str, object], seconds: float):
        """Record one train reply's metrics and how long training took."""
        loss = reply_metrics.get(protocol.TRAIN_LOSS_METRIC)
        examples = reply_metrics.get(protocol.NUM_EXAMPLES_METRIC)
        if isinstance(loss, int | float):
            self.train_loss.set(loss)
        if isinstance(examples, int | float):
            self.train_examples.set(examples)
        self.local_train_seconds.set(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ClientAppError(RuntimeError):
    """The hosted ``ClientApp`` failed on a message."""


def load_client_app(spec: str) -> ClientApp:
    """Import ``module:attribute`` and check that it is a ``ClientApp``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--app must look like 'module:attribute', got {spec!r}")
    app = getattr(importlib.import_module(module_name), attribute, None)
    if not isinstance(app, ClientApp):
        raise ValueError(f"{spec} is not a flwr.clientapp.ClientApp")
    return app


def warm_up(spec: str, service: ClientService) -> float:
    """Run the app module's ``warm_up(context)`` hook, if it has one; seconds taken.

    A ``ClientApp`` module may define ``warm_up`` to load its data and initialise
    its framework before the service reports ready, so that the first training
    request does not pay for it (a late first reply looks like a slow client).
    """
    hook = getattr(importlib.import_module(spec.partition(":")[0]), "warm_up", None)
    if not callable(hook):
        return 0.0
    started = time.monotonic()
    hook(service.context)
    return time.monotonic() - started


def parse_config(text: str) -> dict[str, bool | float | int | str]:
    """Parse Flower's ``key=value key=value`` config syntax into typed values."""
    config: dict[str, bool | float | int | str] = {}
    for item in text.split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config item {item!r} is not key=value")
        config[key] = _typed(raw)
    return config


def _typed(raw: str) -> bool | float | int | str:
    if raw in ("true", "false"):
        return raw == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw.strip('"')


class ClientService:
    """Runs a ``ClientApp`` on the messages that reach it, one at a time."""

    def __init__(
        self,
        app: ClientApp,
        *,
        name: str,
        node_id: int,
        node_config: Mapping[str, bool | float | int | str],
        run_id: int = 1,
    ) -> None:
        self.name = name
        self._app = app
        self._context = Context(
            run_id=run_id,
            node_id=node_id,
            node_config=dict(node_config),
            state=RecordDict(),
            run_config={},
        )
        self._lock = threading.Lock()
        self.metrics = FLMetrics()
        internals.set_task_identity(run_id=run_id, node_id=node_id)

    @property
    def context(self) -> Context:
        """The Flower ``Context`` every message of this client runs in."""
        return self._context

    def handle(self, body: bytes) -> bytes:
        """Decode one message, run the app on it and encode the reply."""
        message = internals.message_from_bytes(body)
        with self._lock:
            started = time.monotonic()
            try:
                reply = self._app(message, self._context)
            except Exception as exc:
                raise ClientAppError(f"{type(exc).__name__}: {exc}") from exc
            if message.metadata.message_type == "train" and reply.has_content():
                metrics: dict[str, object] = {}
                for record in reply.content.metric_records.values():
                    metrics.update(record)
                self.metrics.train_replied(metrics, time.monotonic() - started)
        return internals.message_to_bytes(reply)


def make_handler(
    service: ClientService, max_message_bytes: int
) -> type[BaseHTTPRequestHandler]:
    """An HTTP handler class bound to ``service``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == protocol.HEALTH_PATH:
                self._reply(HTTPStatus.OK, b"ok\n", "text/plain")
            elif self.path == METRICS_PATH:
                body = service.metrics.exposition()
                self._reply(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != protocol.MESSAGE_PATH:
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                return
            length = int(self.headers.get("content-length") or 0)
            if length > max_message_bytes:
                self._reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{length} bytes")
                return
            self._serve_message(self.rfile.read(length))

        def _serve_message(self, body: bytes) -> None:
            started = time.monotonic()
            try:
                reply = service.handle(body)
            except internals.WireError as exc:
                self._reject(HTTPStatus.BAD_REQUEST, str(exc))
            except ClientAppError as exc:
                self._reject(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
            else:
                self._reply(HTTPStatus.OK, reply, protocol.MESSAGE_CONTENT_TYPE)
                log.info(
                    "%s served round %s slot %s in %.2fs",
                    service.name,
                    self.headers.get(protocol.ROUND_HEADER, "?"),
                    self.headers.get(protocol.SLOT_HEADER, "?"),
                    time.monotonic() - started,
                )

        def _reject(self, status: HTTPStatus, reason: str) -> None:
            log.warning("%s rejected a message: %d %s", service.name, status, reason)
            self._reply(status, reason[:500].encode() + b"\n", "text/plain")

        def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                # The caller gave up (its deadline passed); nothing is left to do.
                log.info("%s: the caller left before the reply was sent", service.name)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def serve(
    service: ClientService,
    *,
    host: str,
    port: int,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> ThreadingHTTPServer:
    """Bind the service; the caller runs ``serve_forever`` and ``shutdown``."""
    server = bind(host, port)
    server.RequestHandlerClass = make_handler(service, max_message_bytes)
    return server


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (0: a free port) that serves nothing yet.

    Binding comes first so that the port is known, and held, while the app
    loads; connections wait in the backlog until ``serve_forever``, with the
    handler that :func:`serve` sets.
    """
    server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    server.daemon_threads = True
    return server


def _report_port(path: Path, port: int) -> None:
    """Write the bound port to ``path`` whole: a reader sees it all or nothing."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point of a client service process."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MESHCTL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    server = bind(args.host, args.port)
    port = server.server_address[1]
    if args.port_file:
        _report_port(Path(args.port_file), port)
    service = ClientService(
        load_client_app(args.app),
        name=args.name,
        node_id=args.node_id,
        node_config=parse_config(args.node_config),
    )
    warm_s = warm_up(args.app, service)
    server.RequestHandlerClass = make_handler(service, DEFAULT_MAX_MESSAGE_BYTES)
    signal.signal(
        signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start()
    )
    log.info(
        "%s listening on %s:%d (warmed up in %.1fs)",
        args.name,
        args.host,
        port,
        warm_s,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", required=True, help="the ClientApp, as module:attr")
    parser.add_argument("--name", required=True, help="client id, e.g. c-03")
    parser.add_argument("--node-id", type=int, default=0, help="Flower node id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "--port", type=int, default=0, help="port to bind (default: a free one)"
    )
    parser.add_argument(
        "--port-file", help="write the bound port here once bound, before loading"
    )
    parser.add_argument(
        "--node-config", default="", help="Flower node config: 'key=value ...'"
    )
    return parser


if __name__ == "__main__":
    main()
