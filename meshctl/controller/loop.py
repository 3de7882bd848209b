"""The controller in a cluster: ``meshctl run``.

It serves the round API the FL server calls (``/v1/rounds/arm``,
``/v1/rounds/feedback``), ``/healthz`` (alive), ``/readyz`` (ready once the
routing objects and the client pods were read from the API server) and
``/metrics`` (on the same port, or on ``metrics_listen``).  Each armed round
is applied through the cluster backend, a settle time after each step.

It also watches its VirtualService and DestinationRule.  When another writer
changes the routes or subsets meshctl owns (a ``kubectl apply`` from Git, say),
or deletes one of the objects, the change is seen on its watch event and the
intended routes are applied again at once, the other writer's own fields kept
(a deleted object is created again whole, as meshctl last wrote it).  If the
reverting goes on (more than ``reassert_limit`` re-asserts within
``reassert_window_s``), the controller backs off, doubling the delay up to a
limit, and posts a Warning Event on the object so that an operator sees who is
fighting over it.

With ``state_path`` the controller saves its state after each round and
recovers it at start (see :mod:`meshctl.controller.state`): a restarted pod
puts the feedback of the round in flight under the right clients and writes
no route until the next round.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshctl.backends import cluster
from meshctl.controller import metrics as metrics_text
from meshctl.controller import roundapi
from meshctl.controller.cycle import ArmError, Controller, TelemetrySource
from meshctl.controller.roundapi import RoundAPIServer
from meshctl.controller.select import PodView, settle_wait
from meshctl.kube import errors as kube_errors
from meshctl.kube import events as kube_events
from meshctl.kube import watch as kube_watch
from meshctl.policies import Policy
from meshctl.protocol import ROUTING_VERSION_ANNOTATION
from meshctl.routing import render, validate
from meshctl.types import ArmedRound

log = logging.getLogger("meshctl.loop")

READY_PATH = "/readyz"
REVERTED_REASON = "RoutesReverted"
_KINDS = (validate.DESTINATION_RULE, validate.VIRTUAL_SERVICE)


@dataclass(frozen=True)
class LoopSettings:
    """How the controller serves, waits, watches and backs off."""

    listen: tuple[str, int] = ("0.0.0.0", 8080)
    metrics_listen: tuple[str, int] | None = None
    # The round API's bearer token (MESHCTL_ROUND_API_TOKEN_FILE or
    # MESHCTL_ROUND_API_TOKEN); None serves the API without authentication.
    round_api_token: str | None = field(
        default_factory=roundapi.token_from_environment, repr=False
    )
    window_s: float = 300.0
    settle_s: float = 5.0
    mode: str = "exact"
    watch_timeout_s: float = kube_watch.DEFAULT_WATCH_TIMEOUT_S
    reassert_limit: int = 3
    reassert_window_s: float = 60.0
    backoff_s: tuple[float, float] = (10.0, 300.0)
    retry_s: tuple[float, float] = (1.0, 30.0)
    # The controller's state file (on a volume that survives the pod); None
    # keeps no state, and a restart starts fresh.
    state_path: Path | None = None


def parse_address(text: str | None) -> tuple[str, int] | None:
    """``host:port`` (or ``:port``) as a pair; ValueError naming the text."""
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return host or "0.0.0.0", int(port)


# --- the pieces ------------------------------------------------------------------


class RecordingBackend(cluster.ClusterBackend):
    """The cluster backend, remembering the last object meshctl wrote of each kind."""

    def __init__(self, backend: cluster.ClusterBackend) -> None:
        super().__init__(
            backend.api,
            namespace=backend.namespace,
            name=backend.name,
            field_manager=backend.field_manager,
            schemas=backend._schemas,
            budget_bytes=backend._budget_bytes,
            max_attempts=backend.max_attempts,
        )
        self._intended_lock = threading.Lock()
        self._intended: dict[str, dict] = {}

    def write(self, obj: dict) -> dict:
        stored = super().write(obj)
        self.remember(stored)
        return stored

    def remember(self, obj: dict) -> None:
        """Take ``obj`` as what meshctl intends its kind to hold."""
        with self._intended_lock:
            self._intended[obj["kind"]] = obj

    def intended(self, kind: str) -> dict | None:
        with self._intended_lock:
            return self._intended.get(kind)


class ClusterController(Controller):
    """The controller, with the client pods listed afresh before each round.

    ``routing_lock`` is held while a round is armed, so that re-asserting the
    routes never runs between the steps of a plan.
    """

    def __init__(self, *, pods: PodView, routing_lock: threading.Lock, **options):
        super().__init__(clients=(), ready=pods.ready, **options)
        self._pods = pods
        self._routing_lock = routing_lock

    def arm(self, server_round: int, per_round: int) -> ArmedRound:
        with self._routing_lock:
            try:
                self.clients = self._pods.refresh()
            except kube_errors.KubeError as exc:
                raise ArmError(
                    f"round {server_round}: cannot list the client pods ({exc}); "
                    "the routes in place stay as they are"
                ) from exc
            return super().arm(server_round, per_round)


def drifted(kind: str, live: Mapping | None, intended: Mapping | None) -> bool:
    """True when ``live`` no longer holds meshctl's part of ``intended``
    (or no longer exists)."""
    if intended is None:
        return False
    if live is None:
        return True
    if _annotation(live) != _annotation(intended):
        return True
    if kind == validate.VIRTUAL_SERVICE:
        return _owned_routes(live) != _owned_routes(intended)
    owned = render.owned_subset_names(intended)
    return _subsets(live, owned) != _subsets(intended, owned)


def _annotation(obj: Mapping) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ROUTING_VERSION_ANNOTATION)


def _owned_routes(vs: Mapping) -> list:
    routes = (vs.get("spec") or {}).get("http") or []
    return [r for r in routes if validate.is_owned_route(r)]


def _subsets(dr: Mapping, names: set[str]) -> dict:
    subsets = (dr.get("spec") or {}).get("subsets") or []
    return {s.get("name"): s for s in subsets if s.get("name") in names}


class ReassertBudget:
    """How often the routes may be re-asserted before backing off.

    Up to ``limit`` re-asserts within ``window_s`` go through at once.  The next
    one waits ``first_s``, the one after that twice as long, up to ``longest_s``;
    a window without re-asserts forgets the back-off.
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        backoff_s: tuple[float, float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.first_s, self.longest_s = backoff_s
        self._clock = clock
        self._times: collections.deque[float] = collections.deque()
        self._backoffs = 0
        self._allowed_at: float | None = None

    def delay_s(self) -> tuple[float, bool]:
        """Seconds to wait before the next re-assert, and whether a back-off began."""
        now = self._clock()
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        if not self._times:
            self._backoffs = 0
        if self._allowed_at is not None:
            if now >= self._allowed_at:
                self._allowed_at = None
                return 0.0, False
            return self._allowed_at - now, False
        if len(self._times) < self.limit:
            return 0.0, False
        delay_s = min(self.first_s * 2**self._backoffs, self.longest_s)
        self._backoffs += 1
        self._allowed_at = now + delay_s
        return delay_s, True

    def record(self) -> None:
        self._times.append(self._clock())


# --- the loop --------------------------------------------------------------------


class ControllerLoop:
    """The controller's servers and watches, from ``start`` to ``stop``."""

    def __init__(
        self,
        backend: cluster.ClusterBackend,
        telemetry: TelemetrySource,
        policy: Policy,
        settings: LoopSettings = LoopSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.backend = RecordingBackend(backend)
        self.api = backend.api
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.routing_lock = threading.Lock()
        self.pods = PodView(self.backend)
        self.controller = ClusterController(
            pods=self.pods,
            routing_lock=self.routing_lock,
            policy=policy,
            telemetry=telemetry,
            backend=self.backend,
            wait=settle_wait(settings.settle_s, self._stop),
            window_s=settings.window_s,
            namespace=backend.namespace,
            mode=settings.mode,
            state_path=settings.state_path,
        )
        self.budget = ReassertBudget(
            settings.reassert_limit,
            settings.reassert_window_s,
            settings.backoff_s,
            clock,
        )
        self._dirty = threading.Condition()
        self._pending: set[str] = set()
        self._watches: dict[str, kube_watch.ObjectWatch] = {}
        self._threads: list[threading.Thread] = []
        self._servers: list[RoundAPIServer | _MetricsServer] = []
        # Counters an operator (and a test) can follow.
        self.events_seen = 0
        self.reasserts = 0
        self.drifts = 0
        self.warnings_posted = 0

    @property
    def url(self) -> str:
        return self._servers[0].url

    @property
    def metrics_url(self) -> str:
        return self._servers[-1].url

    def start(self) -> ControllerLoop:
        """Listen, then read the objects and start watching them (in a thread)."""
        host, port = self.settings.listen
        token = self.settings.round_api_token
        if token is None:
            log.warning(
                "the round API on %s:%d takes calls without a token; set %s",
                host,
                port,
                roundapi.TOKEN_FILE_ENV,
            )
        self._servers.append(
            _ClusterRoundAPI(self.controller, self.ready, host, port, token).start()
        )
        if self.settings.metrics_listen is not None:
            host, port = self.settings.metrics_listen
            self._servers.append(_MetricsServer(self.controller, host, port).start())
        self._spawn("startup", self._startup)
        return self

    def request_stop(self) -> None:
        """Ask the loop to end (safe in a signal handler)."""
        self._stop.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a stop is requested; True if it was."""
        return self._stop.wait(timeout_s)

    def stop(self) -> None:
        """Stop serving and watching; a round being armed finishes its step."""
        self._stop.set()
        with self._dirty:
            self._dirty.notify_all()
        for object_watch in list(self._watches.values()):
            object_watch.close()
        for server in self._servers:
            server.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        log.info("controller stopped")

    # -- startup and watching

    def _startup(self) -> None:
        """Read the objects until the API server answers, then watch them."""
        versions = self._retry("read the routing objects", self._read_all)
        if versions is None:
            return
        self.ready.set()
        log.info(
            "ready: %d client pods in %s, watching %s/%s",
            len(self.pods.names),
            self.backend.namespace,
            self.backend.namespace,
            self.backend.name,
        )
        for kind in _KINDS:
            self._spawn(f"watch-{kind}", self._watch_loop, kind, versions[kind])
        self._spawn("reassert", self._reassert_loop)

    def _read_all(self) -> dict[str, str | None]:
        """Read both objects and the pods; adopt live objects meshctl wrote."""
        self.pods.refresh()
        live = dict(
            zip(
                (validate.VIRTUAL_SERVICE, validate.DESTINATION_RULE),
                self.backend.read(),
                strict=True,
            )
        )
        for obj in live.values():
            if (
                obj is not None
                and _annotation(obj)
                and self.backend.intended(obj["kind"]) is None
            ):
                self.backend.remember(obj)
        return {
            kind: (obj or {}).get("metadata", {}).get("resourceVersion")
            for kind, obj in live.items()
        }

    def _watch_loop(self, kind: str, resource_version: str | None) -> None:
        """Watch one object for as long as the loop runs, resuming after errors."""
        resource = self.api.resource(render.API_VERSION, kind)
        failures = 0
        while not self._stop.is_set():
            object_watch = kube_watch.ObjectWatch(
                self.api,
                resource,
                self.backend.namespace,
                self.backend.name,
                timeout_s=self.settings.watch_timeout_s,
            )
            self._watches[kind] = object_watch
            if self._stop.is_set():
                return
            try:
                for event in object_watch.events(resource_version):
                    failures = 0
                    resource_version = event.resource_version or resource_version
                    self._on_event(kind, event)
            except kube_watch.Expired:
                log.info("%s: watch expired; reading it again", kind)
                resource_version = None
            except kube_errors.KubeError as exc:
                failures += 1
                delay_s = _backoff(self.settings.retry_s, failures)
                log.warning(
                    "%s watch failed (%s); watching again in %.0f s", kind, exc, delay_s
                )
                self._stop.wait(delay_s)

    def _on_event(self, kind: str, event: kube_watch.WatchEvent) -> None:
        """Note an event; one that undoes meshctl's part wakes the re-asserter."""
        self.events_seen += 1
        if event.type == "BOOKMARK":
            return
        if event.type == "DELETED":
            log.warning(
                "%s %s/%s was deleted; meshctl creates it again",
                kind,
                self.backend.namespace,
                self.backend.name,
            )
        live = None if event.type == "DELETED" else event.obj
        if drifted(kind, live, self.backend.intended(kind)):
            self._mark(kind)

    def _mark(self, kind: str) -> None:
        with self._dirty:
            self._pending.add(kind)
            self._dirty.notify_all()

    # -- re-asserting

    def _reassert_loop(self) -> None:
        """Wait for drift, then re-assert the routes (or back off)."""
        failures = 0
        while not self._stop.is_set():
            with self._dirty:
                while not self._pending and not self._stop.is_set():
                    self._dirty.wait(timeout=1.0)
                self._pending.clear()
            if self._stop.is_set():
                return
            try:
                self._reassert_once()
                failures = 0
            except Exception as exc:  # keep watching whatever one attempt did
                failures += 1
                delay_s = _backoff(self.settings.retry_s, failures)
                log.error(
                    "re-asserting the routes failed (%s); retrying in %.0f s",
                    exc,
                    delay_s,
                )
                self._stop.wait(delay_s)
                self._mark(validate.VIRTUAL_SERVICE)

    def _reassert_once(self) -> None:
        """Re-read; if meshctl's part was changed, apply it again or back off."""
        with self.routing_lock:
            live_vs, live_dr = self.backend.read()
            live = {
                validate.VIRTUAL_SERVICE: live_vs,
                validate.DESTINATION_RULE: live_dr,
            }
            changed = [
                k for k in _KINDS if drifted(k, live[k], self.backend.intended(k))
            ]
            if not changed:
                return
            self.drifts += 1
            delay_s, began = self.budget.delay_s()
            if delay_s <= 0:
                for kind in changed:  # subsets before the routes that use them
                    self._reassert(kind, live_vs, live_dr)
                self.budget.record()
                return
        self._back_off(changed, live, delay_s, began)

    def _reassert(self, kind: str, live_vs: dict | None, live_dr: dict | None) -> None:
        intended = self.backend.intended(kind)
        if kind == validate.VIRTUAL_SERVICE:
            rebased = cluster.rebase_virtual_service(intended, live_vs)
        else:
            rebased = cluster.rebase_destination_rule(intended, live_dr, live_vs)
        self.backend.write(rebased)
        self.reasserts += 1
        log.warning(
            "%s: another writer changed meshctl's %s; routing version %s re-asserted",
            validate.object_label(rebased),
            "routes" if kind == validate.VIRTUAL_SERVICE else "subsets",
            _annotation(rebased),
        )

    def _back_off(
        self, changed: list[str], live: dict, delay_s: float, began: bool
    ) -> None:
        """Wait before re-asserting again; say so with a Warning event."""
        message = (
            f"meshctl's routes on {', '.join(changed)} {self.backend.namespace}/"
            f"{self.backend.name} keep being reverted by another writer "
            f"({self.budget.limit} re-asserts within {self.budget.window_s:.0f} s); "
            f"meshctl backs off and applies them again in {delay_s:.0f} s. "
            "Exclude meshctl's fields from your GitOps sync (see the README)."
        )
        log.warning("%s", message)
        if began:
            involved = live[changed[-1]] or {}
            if kube_events.post_warning(self.api, involved, REVERTED_REASON, message):
                self.warnings_posted += 1
        if not self._stop.wait(delay_s):
            self._mark(changed[-1])

    # -- helpers

    def _retry(self, what: str, action: Callable[[], object]):
        """``action()`` until it succeeds or the loop stops (then None)."""
        failures = 0
        while not self._stop.is_set():
            try:
                return action()
            except (kube_errors.KubeError, cluster.ClusterBackendError) as exc:
                failures += 1
                delay_s = _backoff(self.settings.retry_s, failures)
                log.warning("cannot %s (%s); retrying in %.0f s", what, exc, delay_s)
                self._stop.wait(delay_s)
        return None

    def _spawn(self, name: str, target: Callable, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()


def _backoff(retry_s: tuple[float, float], failures: int) -> float:
    first_s, longest_s = retry_s
    return min(first_s * 2 ** max(failures - 1, 0), longest_s)


# --- HTTP --------------------------------------------------------------------------


class _ClusterRoundAPI(RoundAPIServer):
    """The round API with ``/readyz``: 200 once the objects were read."""

    def __init__(
        self,
        controller: Controller,
        ready: threading.Event,
        host: str,
        port: int,
        token: str | None = None,
    ) -> None:
        self._ready = ready
        super().__init__(controller, host, port, token=token)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        base = super()._handler()
        ready = self._ready

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path != READY_PATH:
                    super().do_GET()
                    return
                status = (
                    HTTPStatus.OK if ready.is_set() else HTTPStatus.SERVICE_UNAVAILABLE
                )
                self._send(status, {"status": status.phrase})

        return Handler


class _MetricsServer:
    """``/metrics`` (and ``/healthz``) on a port of its own."""

    def __init__(self, controller: Controller, host: str, port: int) -> None:
        self._controller = controller
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> _MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        controller = self._controller

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path == "/metrics":
                    body = controller.metrics.exposition()
                    content_type = metrics_text.CONTENT_TYPE
                elif self.path == "/healthz":
                    body, content_type = b"ok\n", "text/plain"
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("%s %s", self.address_string(), format % args)

        return Handler
