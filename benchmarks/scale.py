"""One controller cycle at 1,000, 10,000 and 100,000 clients.

Synthetic telemetry for N clients goes through every stage of a cycle:

- ``envoy_stats``: parse Envoy's ``/stats/prometheus`` text for N subsets and
  turn the window since an older snapshot into per-client telemetry, as
  :class:`EnvoyStatsSource` does each cycle (the older snapshot, read by an
  earlier cycle, is parsed once when the inputs are built);
- ``prometheus``: a :class:`PrometheusSource` reads a tiny fake Prometheus
  over loopback that answers every query with N pods; the HTTP requests are
  counted (a fixed set, whatever N);
- ``score_mesh`` and ``score_oort``: each policy chooses K of the N clients
  from the Prometheus telemetry, a column per figure, and the feedback of one
  earlier round of training for every client; on the local path the
  policy first turns the Envoy window, a mapping of client to row, into such a
  table (``envoy_table``);
- ``render``, ``plan`` and ``validate`` (meshctl's rules and the Istio CRD
  schemas) of the routed objects, over the objects of the previous cycle;

and, apart from the stages, ``arm_s``: a whole ``Controller.arm`` over the same
fake Prometheus with the mesh policy, the routes written to a routing
directory and the controller's state file written after it, as ``meshctl run``
arms a round (its metrics included).

Prints, per N, the median seconds per stage and per cycle over a few
repetitions, the peak memory of one more cycle (tracemalloc, which slows
Python several times, so that cycle is not timed), the number of Prometheus
requests and the routed objects' size in bytes, with ratios against the
1,000-client baseline measured in the same run.

A controller's cycle reads one telemetry source and runs one policy, so two
cycles are summed from the stages: the production path (``prometheus``,
``score_mesh``, render, plan, validate) and the local path (``envoy_stats``
and ``envoy_table`` instead of ``prometheus``); the last line says whether the
production cycle at 100,000 clients took under a second.  The Envoy window is
dropped before Prometheus is read, as a controller holds only its own
source's telemetry.

    .venv/bin/python benchmarks/scale.py [--clients 1000 10000 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from meshctl import policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.policies.base import SelectionInput
from meshctl.routing import plan_transition, render_exact, validate
from meshctl.table import TelemetryTable
from meshctl.telemetry import envoystats
from meshctl.telemetry.prometheus import PrometheusSource
from meshctl.types import ClientFeedback, ClientTelemetry, SlotOutcome

ROOT = Path(__file__).resolve().parents[1]
# Istio's CRDs: MESHCTL_ISTIO_CRDS, else in the data directory, as the tests find them.
DATA_DIR = Path(os.environ.get("MESHCTL_DATA_DIR") or ROOT.parent / "shared" / "data")
DEFAULT_CRDS = DATA_DIR / "istio" / "crd-all.gen.yaml"
STAGES = (
    "envoy_stats",
    "envoy_table",
    "prometheus",
    "score_mesh",
    "score_oort",
    "render",
    "plan",
    "validate",
)
_LATENCY_BOUNDS_MS = (1, 5, 10, 50, 100, 500, 1000, 5000)
ROUTING = ("render", "plan", "validate")
PRODUCTION = ("prometheus", "score_mesh", *ROUTING)
LOCAL = ("envoy_stats", "envoy_table", "score_mesh", *ROUTING)
GOAL_CLIENTS, GOAL_S = 100_000, 1.0


def client_ids(n: int) -> list[str]:
    """N client ids, as the local mesh names them."""
    return [f"c-{i:06d}" for i in range(n)]


# ------------------------------------------------------------------ Envoy stats


def envoy_stats_text(clients: list[str], scale: int, seed: int) -> str:
    """Envoy's Prometheus text for one subset cluster per client."""
    rng = random.Random(seed)
    lines = [
        "# TYPE envoy_cluster_upstream_rq_total counter",
        "# TYPE envoy_cluster_upstream_rq_xx counter",
        "# TYPE envoy_cluster_upstream_rq_time histogram",
    ]
    totals, classes, buckets = [], [], []
    for client in clients:
        name = f"outbound|{protocol.SERVICE_PORT}|{client}|{protocol.SERVICE_HOST}"
        label = f'envoy_cluster_name="{name}"'
        total = scale * rng.randint(1, 20)
        errors = rng.randint(0, total // 10)
        totals.append(f"envoy_cluster_upstream_rq_total{{{label}}} {total}")
        for code_class, count in (("2", total - errors), ("5", errors)):
            classes.append(
                f"envoy_cluster_upstream_rq_xx{{envoy_response_code_class="
                f'"{code_class}",{label}}} {count}'
            )
        cumulative = 0
        for bound in _LATENCY_BOUNDS_MS:
            cumulative += rng.randint(0, total // len(_LATENCY_BOUNDS_MS))
            buckets.append(
                f'envoy_cluster_upstream_rq_time_bucket{{{label},le="{bound}"}} '
                f"{min(cumulative, total)}"
            )
        buckets.append(
            f'envoy_cluster_upstream_rq_time_bucket{{{label},le="+Inf"}} {total}'
        )
        buckets.append(f"envoy_cluster_upstream_rq_time_sum{{{label}}} {total * 40}")
        buckets.append(f"envoy_cluster_upstream_rq_time_count{{{label}}} {total}")
    return "\n".join(lines[:1] + totals + lines[1:2] + classes + lines[2:] + buckets)


def envoy_window(
    older: envoystats.Snapshot, newer_text: str
) -> dict[str, ClientTelemetry]:
    """Per-client telemetry from a snapshot to a stats text 30 s later."""
    newer = envoystats.Snapshot(
        older.taken_at + 30.0, envoystats.parse_prometheus(newer_text)
    )
    return envoystats.window(older, newer)


# ------------------------------------------------------------ a fake Prometheus

# What in a query's text says which of the cycle's figures it asks for.
_QUERY_MARKERS = (
    ("histogram_quantile(0.5,", "p50"),
    ("histogram_quantile(0.95,", "p95"),
    ("meshctl_fl_train_loss", "loss"),
    ("meshctl_fl_train_examples", "examples"),
    ("meshctl_fl_local_train_seconds", "train_s"),
    ("by (destination_pod)", "mesh"),
    ('response_code=~"5..|0"', "errors"),
)


class FakePrometheus:
    """Answers each of a cycle's queries with plausible values per pod; counts
    requests.

    As Prometheus does for ``sum by (label)``, a sample carries only the label
    the query groups by (``pod``, or ``destination_pod`` for mesh failures).
    One pod in twenty served nothing in the window (no destination series), and
    one in twenty has mesh failures (the only pods with such a series).
    """

    def __init__(self, clients: list[str], seed: int = 0) -> None:
        rng = random.Random(seed)
        self.requests = 0
        self._lock = threading.Lock()
        served = [c for c in clients if rng.random() >= 0.05]
        p50 = [rng.uniform(20, 500) for _ in served]
        figures: dict[str, list[tuple[str, float]]] = {
            "rate": [(c, rng.uniform(0.1, 2)) for c in served],
            "errors": [
                (c, rng.choice([0.0, 0.0, rng.uniform(0, 0.2)])) for c in served
            ],
            "p50": list(zip(served, p50, strict=True)),
            "p95": [
                (c, v * rng.uniform(1, 4)) for c, v in zip(served, p50, strict=True)
            ],
            "mesh": [
                (c, rng.uniform(0.01, 0.5)) for c in clients if rng.random() < 0.05
            ],
            "loss": [(c, rng.uniform(0.01, 2)) for c in clients],
            "examples": [(c, float(rng.randint(100, 5000))) for c in clients],
            "train_s": [(c, rng.uniform(1, 100)) for c in clients],
        }
        self._answers = {
            name: self._vector("destination_pod" if name == "mesh" else "pod", series)
            for name, series in figures.items()
        }
        self._config = json.dumps(
            {"status": "success", "data": {"yaml": "global:\n  scrape_interval: 15s\n"}}
        ).encode()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def _vector(label: str, series: list[tuple[str, float]]) -> bytes:
        result = [{"metric": {label: c}, "value": [1e9, f"{v:.4f}"]} for c, v in series]
        answer = {
            "status": "success",
            "data": {"resultType": "vector", "result": result},
        }
        return json.dumps(answer, separators=(",", ":")).encode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _vector_for(self, path: str) -> bytes:
        """The answer to the query in ``path``, by what it asks for."""
        query = parse_qs(urlsplit(path).query).get("query", [""])[0]
        for marker, name in _QUERY_MARKERS:
            if marker in query:
                return self._answers[name]
        return self._answers["rate"]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with fake._lock:
                    fake.requests += 1
                config = self.path.startswith("/api/v1/status/config")
                body = fake._config if config else fake._vector_for(self.path)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler


# ------------------------------------------------------------------- one cycle


def trained_once(clients: list[str], seed: int) -> dict[str, tuple]:
    """Feedback of one round of training for every client, as after a long run:
    round 0, a loss and an example count each."""
    rng = random.Random(seed)
    return {
        client: (
            ClientFeedback(
                client,
                SlotOutcome(
                    server_round=0,
                    slot=1,
                    status="ok",
                    duration_s=rng.uniform(1, 30),
                    num_examples=rng.randint(100, 5000),
                    train_loss=rng.uniform(0.01, 2),
                ),
            ),
        )
        for client in clients
    }


@dataclass
class CycleResult:
    """What one cycle took and produced."""

    seconds: dict[str, float] = field(default_factory=dict)
    prometheus_requests: int = 0
    object_bytes: int = 0
    problems: int = 0
    routed: tuple[str, ...] = ()


@contextmanager
def _timed(result: CycleResult, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    result.seconds[stage] = time.perf_counter() - started


class Cycle:
    """The inputs of a cycle for N clients, built once; :meth:`run` times one."""

    def __init__(
        self,
        n: int,
        *,
        per_round: int = 10,
        schemas: dict | None = None,
        with_prometheus: bool = True,
        seed: int = 0,
    ) -> None:
        self.clients = client_ids(n)
        self.per_round = per_round
        self.schemas = schemas
        self._older = envoystats.Snapshot(
            0.0, envoystats.parse_prometheus(envoy_stats_text(self.clients, 1, seed))
        )
        self._newer_text = envoy_stats_text(self.clients, 3, seed + 1)
        self.fake = FakePrometheus(self.clients, seed) if with_prometheus else None
        self.source = (
            PrometheusSource(self.fake.url, clock=lambda: 1e9)
            if self.fake is not None
            else None
        )
        self.policies = {name: policies.create(name) for name in ("mesh", "oort")}
        self.history = trained_once(self.clients, seed)
        self.live: tuple[dict | None, dict | None] = (None, None)
        self.round = 0

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self.fake is not None:
            self.fake.stop()

    def run(self) -> CycleResult:
        """One cycle; the objects it renders are the next cycle's live ones."""
        result = CycleResult()
        self.round += 1
        with _timed(result, "envoy_stats"):
            window = envoy_window(self._older, self._newer_text)
        with _timed(result, "envoy_table"):
            telemetry = TelemetryTable.of(window)
        del window
        if self.source is not None:
            del telemetry
            before = self.fake.requests
            with _timed(result, "prometheus"):
                telemetry = self.source.read(60.0)
            result.prometheus_requests = self.fake.requests - before

        chosen: tuple[str, ...] = ()
        for name, policy in self.policies.items():
            given = SelectionInput(
                server_round=self.round,
                candidates=self.clients,
                per_round=self.per_round,
                telemetry=telemetry,
                history=self.history,
            )
            with _timed(result, f"score_{name}"):
                selection = policy.select(given, random.Random(self.round))
            chosen = chosen or selection.clients
        result.routed = chosen

        live_vs, live_dr = self.live
        assignment = dict(enumerate(chosen, start=1))
        with _timed(result, "render"):
            vs, dr = render_exact(
                assignment,
                routing_version=f"r{self.round}",
                live_vs=live_vs,
                live_dr=live_dr,
            )
        with _timed(result, "plan"):
            plan_transition(live_vs, live_dr, vs, dr, ready_subsets=self.clients)
        with _timed(result, "validate"):
            found = validate.validate_objects([vs, dr], schemas=self.schemas)
        result.problems = len(found)
        result.object_bytes = len(json.dumps(vs)) + len(json.dumps(dr))
        self.live = (vs, dr)
        return result


class ControllerCycle:
    """A whole :meth:`Controller.arm` for N clients, as ``meshctl run`` does it:
    the Prometheus read, the mesh policy, the routes written to a directory
    (validated first) and the state file written after the arm."""

    def __init__(
        self, n: int, *, per_round: int = 10, schemas: dict | None = None
    ) -> None:
        clients = client_ids(n)
        self.per_round = per_round
        self.fake = FakePrometheus(clients)
        self.source = PrometheusSource(self.fake.url, clock=lambda: 1e9)
        self._dir = tempfile.TemporaryDirectory(prefix="meshctl-scale-")
        work = Path(self._dir.name)
        self.controller = Controller(
            clients=clients,
            policy=policies.create("mesh"),
            telemetry=self.source,
            backend=DirectoryBackend(work / "routing", schemas=schemas),
            wait=lambda step: 0.0,
            ready=lambda: clients,
            state_path=work / "state.json",
        )
        self.round = 0

    def arm_s(self) -> float:
        """Seconds one arm took."""
        self.round += 1
        started = time.perf_counter()
        self.controller.arm(self.round, self.per_round)
        return time.perf_counter() - started

    def close(self) -> None:
        self.source.close()
        self.fake.stop()
        self._dir.cleanup()


# ---------------------------------------------------------------------- report


def _median(results: list[CycleResult], stage: str) -> float:
    return statistics.median(r.seconds.get(stage, 0.0) for r in results)


def _cycle_s(results: list[CycleResult], stages: tuple[str, ...]) -> float:
    """The median over repetitions of one path's cycle: the sum of its stages."""
    return statistics.median(
        sum(r.seconds.get(s, 0.0) for s in stages) for r in results
    )


def measure(n: int, repeat: int, schemas: dict | None) -> dict:
    """Median stage times, peak memory, requests and object size for N, and
    the median whole arm, each measured with only its own inputs alive."""
    results, peak_bytes = _stage_cycles(n, repeat, schemas)
    arm_s = _controller_arms(n, repeat, schemas)
    return {
        "n": n,
        "stages": {s: _median(results, s) for s in STAGES},
        "cycle_s": statistics.median(sum(r.seconds.values()) for r in results),
        "production_s": _cycle_s(results, PRODUCTION),
        "local_s": _cycle_s(results, LOCAL),
        "arm_s": arm_s,
        "peak_mib": peak_bytes / 2**20,
        "requests": results[-1].prometheus_requests,
        "object_bytes": results[-1].object_bytes,
        "problems": results[-1].problems,
    }


def _stage_cycles(
    n: int, repeat: int, schemas: dict | None
) -> tuple[list[CycleResult], int]:
    """``repeat`` timed cycles, and the peak bytes of one more."""
    cycle = Cycle(n, schemas=schemas)
    try:
        cycle.run()  # warm-up: first config read, first live objects
        results = [cycle.run() for _ in range(repeat)]
        tracemalloc.start()
        cycle.run()
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        cycle.close()
    return results, peak_bytes


def _controller_arms(n: int, repeat: int, schemas: dict | None) -> float:
    """The median of ``repeat`` whole arms."""
    controller = ControllerCycle(n, schemas=schemas)
    try:
        controller.arm_s()  # warm-up: the first state file, the first routes
        return statistics.median(controller.arm_s() for _ in range(repeat))
    finally:
        controller.close()


def _print(rows: list[dict]) -> None:
    base = rows[0]
    header = [
        "clients",
        *STAGES,
        "cycle_s",
        "x base",
        "production_s",
        "local_s",
        "arm_s",
        "peak MiB",
        "queries",
        "bytes",
    ]
    print(" ".join(f"{h:>11}" for h in header))
    for row in rows:
        ratio = row["cycle_s"] / base["cycle_s"] if base["cycle_s"] else float("nan")
        cells = [
            f"{row['n']:>11,}",
            *(f"{row['stages'][s]:>11.4f}" for s in STAGES),
            f"{row['cycle_s']:>11.4f}",
            f"{ratio:>10.1f}x",
            f"{row['production_s']:>11.4f}",
            f"{row['local_s']:>11.4f}",
            f"{row['arm_s']:>11.4f}",
            f"{row['peak_mib']:>11.1f}",
            f"{row['requests']:>11}",
            f"{row['object_bytes']:>11,}",
        ]
        print(" ".join(cells))
    print()
    for row in rows[1:]:
        parts = ", ".join(
            f"{s} {row['stages'][s] / base['stages'][s]:.1f}x"
            for s in STAGES
            if base["stages"][s] > 0
        )
        print(f"{row['n']:,} vs {base['n']:,} clients: {parts}")
    print(
        "routed objects: "
        + ", ".join(f"{r['n']:,} -> {r['object_bytes']:,} B" for r in rows)
        + "; schema problems: "
        + ", ".join(str(r["problems"]) for r in rows)
    )
    print(
        "cycle time excludes the tracemalloc pass; peak memory comes from "
        "one more cycle run under tracemalloc"
    )
    print(goal_line(rows))


def goal_line(rows: list[dict]) -> str:
    """Whether the production-path cycle at 100,000 clients took under 1 s."""
    paths = " + ".join(PRODUCTION)
    row = next((r for r in rows if r["n"] == GOAL_CLIENTS), None)
    if row is None:
        return f"goal: {GOAL_CLIENTS:,} clients not measured in this run ({paths})"
    verdict = "met" if row["production_s"] < GOAL_S else "NOT met"
    return (
        f"goal: production cycle ({paths}) at {GOAL_CLIENTS:,} clients in "
        f"{row['production_s']:.3f} s, under {GOAL_S:g} s: {verdict} "
        f"(a whole controller arm, routes and state file written: "
        f"{row['arm_s']:.3f} s; local Envoy path: {row['local_s']:.3f} s)"
    )


def _schemas(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        print(f"no Istio CRDs at {path}: the schema check is left out")
        return None
    return validate.load_crd_schemas(path)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1_000, 10_000, 100_000]
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--crds",
        type=Path,
        default=Path(os.environ.get("MESHCTL_ISTIO_CRDS") or DEFAULT_CRDS),
    )
    args = parser.parse_args(argv)
    schemas = _schemas(args.crds)
    rows = []
    for n in args.clients:
        rows.append(measure(n, args.repeat, schemas))
        row = rows[-1]
        out(
            f"measured {n:,} clients: production cycle {row['production_s']:.3f} s,"
            f" local cycle {row['local_s']:.3f} s"
        )
    _print(rows)


if __name__ == "__main__":
    main()
