"""Routing churn under training traffic: does any request fail while routes change?

Training-shaped traffic (POSTs of about 70 kB, one per armed slot, from a few
sender threads) flows through a real Envoy while the real controller re-arms the
round ``--changes`` times: every change moves each slot to another client and
replaces one client by another, through the planner, the directory backend and
the local mesh (make-before-break, each step waited for).  The clients are tiny
HTTP servers in threads that answer with their name.

Prints the number of requests and how many failed (anything but a 200 from a
client), Envoy's own counters of mesh-made failures (no route, no healthy
upstream, 503s, 5xx answered downstream), and the time from the start of each
write to Envoy serving it (p50, p99), per kind of step and per whole change.

    .venv/bin/python benchmarks/routing_churn.py --changes 200
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from meshctl import protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.localmesh.envoy import LocalMesh
from meshctl.policies import Selection, SelectionInput
from meshctl.routing.plan import Step
from meshctl.types import Workload

# Envoy counters that count failures the mesh itself makes.
MESH_FAILURE_STATS = (
    "no_route",
    "no_cluster",
    "upstream_cx_none_healthy",
    "upstream_rq_503",
    "downstream_rq_5xx",
)


@dataclass
class ChurnResult:
    """What one churn run saw."""

    changes: int = 0
    requests: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    mesh_failure_stats: dict[str, int] = field(default_factory=dict)
    served_ms: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    change_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        """Requests that did not get a 200 from a client."""
        return sum(self.failures.values())


class RotatingPolicy:
    """Each round, the window of clients moves by one: every slot changes client."""

    name = "rotating"

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        n = len(given.candidates)
        start = given.server_round % n
        chosen = [given.candidates[(start + i) % n] for i in range(given.per_round)]
        return Selection(clients=tuple(chosen))


class NoTelemetry:
    """The churn needs no telemetry: the policy ignores it."""

    def read(self, window_s: float) -> dict:
        return {}


class TimedBackend(DirectoryBackend):
    """A directory backend that notes when each write starts."""

    write_started: float = 0.0

    def write(self, obj: dict) -> None:
        self.write_started = time.perf_counter()
        super().write(obj)


# --- the client services -----------------------------------------------------


def _handler(name: str) -> type[BaseHTTPRequestHandler]:
    """Reads the whole body, answers 200 with the client's name."""
    body = name.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def client_services(names: list[str]) -> Iterator[list[Workload]]:
    """One threaded HTTP server per client on loopback; stopped on exit."""
    servers = []
    try:
        for name in names:
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(name))
            servers.append(server)
            threading.Thread(
                target=server.serve_forever, args=(0.05,), daemon=True
            ).start()
        yield [
            Workload(
                name,
                "127.0.0.1",
                server.server_address[1],
                {protocol.CLIENT_LABEL: name, protocol.APP_LABEL: protocol.APP_VALUE},
            )
            for name, server in zip(names, servers, strict=True)
        ]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# --- traffic -----------------------------------------------------------------


class Senders:
    """Threads that keep posting one training-sized message per armed slot.

    Each sender pauses ``pause_s`` between posts: the senders share the
    controller's interpreter, and a flood would measure the GIL, not the mesh.
    """

    def __init__(
        self,
        url: str,
        slots: int,
        threads: int,
        body_bytes: int,
        names: set[str],
        pause_s: float = 0.0,
    ) -> None:
        self._url = url
        self._pause_s = pause_s
        self._slots = slots
        self._body = bytes(random.Random(0).randbytes(body_bytes))
        self._names = names
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.requests = 0
        self.failures: collections.Counter = collections.Counter()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True)
            for i in range(threads)
        ]

    def start(self) -> Senders:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, index: int) -> None:
        """Post to every armed slot in turn until stopped."""
        with httpx.Client(base_url=self._url, timeout=10.0) as client:
            slot = index
            while not self._stop.is_set():
                slot = slot % self._slots + 1
                self._record(self._post(client, slot))
                self._stop.wait(self._pause_s)

    def _post(self, client: httpx.Client, slot: int) -> str:
        """ "" for a 200 from a client, else what went wrong."""
        headers = {
            "host": protocol.SERVICE_HOST,
            protocol.SLOT_HEADER: str(slot),
            protocol.ROUND_HEADER: "1",
            "content-type": protocol.MESSAGE_CONTENT_TYPE,
        }
        try:
            response = client.post(
                protocol.MESSAGE_PATH, content=self._body, headers=headers
            )
        except httpx.HTTPError as error:
            return f"transport: {type(error).__name__}"
        if response.status_code == 200 and response.text in self._names:
            return ""
        return f"{response.status_code} {response.text[:60]!r}"

    def _record(self, failure: str) -> None:
        with self._lock:
            self.requests += 1
            if failure:
                self.failures[failure] += 1


# --- the run -----------------------------------------------------------------


def mesh_failure_stats(mesh: LocalMesh) -> dict[str, int]:
    """Envoy's counters of mesh-made failures, summed over clusters."""
    text = httpx.get(mesh.admin_url + "/stats", timeout=5.0).text
    totals = dict.fromkeys(MESH_FAILURE_STATS, 0)
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        suffix = key.rsplit(".", 1)[-1]
        if suffix in totals and value.isdigit():
            totals[suffix] += int(value)
    return totals


def run_churn(
    work_dir: Path,
    *,
    clients: int = 6,
    per_round: int = 3,
    changes: int = 200,
    senders: int = 3,
    body_bytes: int = 70_000,
    pause_s: float = 0.005,
) -> ChurnResult:
    """Change the routes ``changes`` times under traffic; what was seen."""
    names = [protocol.client_id(i) for i in range(clients)]
    result = ChurnResult()
    with ExitStack() as stack:
        workloads = stack.enter_context(client_services(names))
        mesh = stack.enter_context(
            LocalMesh(
                work_dir / "envoy",
                routing_dir=work_dir / "routing",
                workloads=workloads,
                log_level="warning",
            )
        )
        backend = TimedBackend(work_dir / "routing", on_change=_pusher(mesh))

        def wait(step: Step) -> float:
            kind = "clusters" if step.kind == "DestinationRule" else "routes"
            version = step.obj["metadata"]["annotations"][
                protocol.ROUTING_VERSION_ANNOTATION
            ]
            waited = mesh.wait_served(kind, version, timeout_s=10.0, poll_s=0.001)
            served_ms = (time.perf_counter() - backend.write_started) * 1e3
            result.served_ms[step.kind].append(served_ms)
            return waited

        controller = Controller(
            clients=names,
            policy=RotatingPolicy(),
            telemetry=NoTelemetry(),
            backend=backend,
            wait=wait,
            ready=lambda: names,
        )
        controller.arm(0, per_round)  # the slots are armed before traffic starts

        traffic = Senders(
            mesh.listen_url, per_round, senders, body_bytes, set(names), pause_s
        )
        started = time.perf_counter()
        traffic.start()
        try:
            for server_round in range(1, changes + 1):
                before = time.perf_counter()
                controller.arm(server_round, per_round)
                result.change_ms.append((time.perf_counter() - before) * 1e3)
                result.changes += 1
        finally:
            traffic.stop()
        result.wall_s = time.perf_counter() - started
        result.requests = traffic.requests
        result.failures = traffic.failures
        result.mesh_failure_stats = mesh_failure_stats(mesh)
    return result


def _pusher(mesh: LocalMesh):
    """The backend's ``on_change``: translate the written object for Envoy."""

    def push(kind: str, obj: dict) -> None:
        if kind == "DestinationRule":
            mesh.apply_destination_rule(obj)
        else:
            mesh.apply_virtual_service(obj)

    return push


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    """Run one churn and print what it saw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200, help="routing changes")
    parser.add_argument("--clients", type=int, default=6, help="client services")
    parser.add_argument("--per-round", type=int, default=3, help="armed slots")
    parser.add_argument("--senders", type=int, default=3, help="sender threads")
    parser.add_argument("--body-bytes", type=int, default=70_000, help="message size")
    parser.add_argument(
        "--pause-ms", type=float, default=5.0, help="pause of each sender between posts"
    )
    args = parser.parse_args()
    # A SIGTERM ends the run through the context managers, so Envoy is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory(prefix="meshctl-churn-") as work_dir:
        result = run_churn(
            Path(work_dir),
            clients=args.clients,
            per_round=args.per_round,
            changes=args.changes,
            senders=args.senders,
            body_bytes=args.body_bytes,
            pause_s=args.pause_ms / 1e3,
        )
    print(
        f"changes={result.changes}  requests={result.requests}  "
        f"failed={result.failed}  wall={result.wall_s:.1f} s  "
        f"({result.requests / result.wall_s:.0f} req/s)"
    )
    for failure, count in result.failures.most_common(5):
        print(f"  failure x{count}: {failure}")
    print(
        "envoy mesh-failure counters: "
        + ", ".join(f"{k}={v}" for k, v in result.mesh_failure_stats.items())
    )
    for kind, samples in sorted(result.served_ms.items()):
        print(
            f"write->served {kind:15} n={len(samples):4}  "
            f"p50={statistics.median(samples):6.1f} ms  "
            f"p99={percentile(samples, 0.99):6.1f} ms  max={max(samples):6.1f} ms"
        )
    ms = result.change_ms
    print(
        f"whole change (plan + {len(result.served_ms)} kinds of step) n={len(ms)}  "
        f"p50={statistics.median(ms):6.1f} ms  p99={percentile(ms, 0.99):6.1f} ms"
    )


if __name__ == "__main__":
    main()
