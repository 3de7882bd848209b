"""Many rounds through the local mesh with many client services: nothing lost?

N client services (one process each, hosting the light ClientApp of
``load_client_app``) stand behind a real Envoy; the real controller arms each
round over its round API (bearer token), choosing K clients with a policy and
routing one slot to each; Flower's FedAvg, unmodified, trains them over the
mesh grid for R rounds.  Every round is checked exactly:

- the global model's ledger says whose update FedAvg aggregated, with what
  weight: it must be every client the controller selected, weighted by its
  known example count, except the clients set to fail (a lost update otherwise);
- Envoy's own counters (``served_by`` between snapshots before and after the
  round) must name the selected clients, one request each; a client set to
  fail may have none, once Envoy's outlier detection has ejected it;
- every slot is ``ok``, except the slots of clients set to fail, which must fail.

After the run Envoy's counters must match: no route, no cluster and unarmed
slots 0; no healthy upstream once per ejected request; 5xx, downstream and on
the clients' clusters, once per planted failure.

Prints the time to start the N services, rounds per minute, the per-round wall
time and the controller's arm time (p50, p95), the requests sent, served and
failed, the lost updates and the summed peak RSS of the client processes, with
ratios against a baseline of fewer clients measured in the same run.  Exits 1
when an update was lost or a request failed that no planted fault explains.

    .venv/bin/python benchmarks/load.py [--clients 50] [--per-round 10] [--rounds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import load_client_app
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from meshctl import policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.controller.roundapi import RoundAPIClient, RoundAPIServer
from meshctl.flower.grid import MeshGrid
from meshctl.localmesh.envoy import LocalMesh
from meshctl.localmesh.workloads import ClientSpec, LocalWorkloads
from meshctl.routing.plan import Step
from meshctl.telemetry.envoystats import EnvoyStatsSource, Snapshot
from meshctl.types import ArmedRound, SlotOutcome

HERE = Path(__file__).resolve().parent
CLIENT_APP = "load_client_app:app"
# A ledger entry within this of its expected value is exact up to rounding; a
# lost or doubled update moves it by at least 1 / (K * max examples).
LEDGER_TOLERANCE = 1e-9
PAYLOAD_RTOL = 1e-4
MAX_EXAMPLES = 7

# Envoy's counters that a run checks, each summed over the stats its regex
# matches (the per-subset clusters for the last two).
ENVOY_STATS = {
    "no_route": r"^http\.fl_clients\.no_route$",
    "no_cluster": r"^http\.fl_clients\.no_cluster$",
    "unarmed_slot": r"^http\.fl_clients\.rq_direct_response$",
    "no_healthy": r"^cluster\.outbound\|[^.]*\.upstream_cx_none_healthy$",
    "downstream_5xx": r"^http\.fl_clients\.downstream_rq_5xx$",
    "upstream_5xx": r"^cluster\.outbound\|[^.]*\.upstream_rq_5xx$",
}

log = logging.getLogger("meshctl.bench.load")


class LoadCheckError(RuntimeError):
    """The load run itself could not be carried out (not a failed check)."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class LoadSettings:
    """One load run: N services, K per round, R rounds, a policy.

    ``failing`` names the clients set to fail on purpose (their ClientApp
    raises): the checks expect exactly their slots to fail.  ``node_config``
    adds node config to some clients without telling the checks: how a test
    plants a fault that the checks must find.
    """

    clients: int = 50
    per_round: int = 10
    rounds: int = 30
    policy: str = "random"
    failing: tuple[str, ...] = ()
    payload_floats: int = 17_500  # about 70 kB, the size of the FLUIDS model
    deadline_s: float = 10.0
    window_s: float = 30.0
    seed: int = 0
    ready_timeout_s: float = 300.0
    node_config: Mapping[str, Mapping[str, bool | int]] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ValueError`` naming the setting that cannot work."""
        if not 1 <= self.per_round <= self.clients:
            raise ValueError(
                f"--per-round ({self.per_round}) must be between 1 and "
                f"--clients ({self.clients})"
            )
        if self.rounds < 1:
            raise ValueError(f"--rounds ({self.rounds}) must be at least 1")
        unknown = sorted(set(self.failing) - set(self.client_ids))
        if unknown:
            raise ValueError(f"failing clients {unknown} are not among the clients")
        policies.resolve(self.policy)  # UnknownPolicy names the valid ones

    @property
    def client_ids(self) -> list[str]:
        return [protocol.client_id(i) for i in range(self.clients)]


def examples_of(index: int) -> int:
    """The example count client ``index`` reports: 1 to MAX_EXAMPLES."""
    return 1 + index % MAX_EXAMPLES


def spread_clients(clients: int, count: int) -> tuple[str, ...]:
    """``count`` client ids spread evenly over ``clients``."""
    if count <= 0:
        return ()
    step = clients / count
    return tuple(protocol.client_id(int(step * (j + 0.5))) for j in range(count))


def client_specs(settings: LoadSettings) -> list[ClientSpec]:
    """One client service per client: its ledger entry, examples and faults."""
    specs = []
    for index, name in enumerate(settings.client_ids):
        config = {"index": index, "examples": examples_of(index)}
        if name in settings.failing:
            config["fail"] = True
        config.update(settings.node_config.get(name, {}))
        specs.append(ClientSpec(name, CLIENT_APP, config, node_id=index + 1))
    return specs


# ------------------------------------------------------------------- checks


@dataclass(frozen=True)
class RoundCheck:
    """What one round did, and what was wrong with it."""

    server_round: int
    selected: tuple[str, ...]
    statuses: Mapping[str, str]  # client -> slot status
    served_by: Mapping[str, int]  # client -> upstream requests, Envoy's count
    aggregated: tuple[str, ...]  # clients whose update the global model holds
    lost: tuple[str, ...]  # expected in the aggregate, missing from it
    unexpected_failures: tuple[str, ...]
    planted_failures: tuple[str, ...]
    ejected: tuple[str, ...]  # planted failures that Envoy answered itself
    problems: tuple[str, ...]
    wall_s: float
    arm_s: float
    served_waits_s: tuple[float, ...]


def check_aggregate(
    delta: np.ndarray, clients: Sequence[str], expected: Mapping[str, int]
) -> tuple[list[str], list[str], list[str]]:
    """Compare a round's ledger change with the updates FedAvg should have kept.

    ``expected`` maps each client whose update must be in the aggregate to its
    example count.  Returns the clients found in the aggregate, the expected
    ones missing from it (lost updates) and a sentence per discrepancy.
    """
    total = sum(expected.values())
    found, lost, problems = [], [], []
    for index, client in enumerate(clients):
        want = expected[client] / total if client in expected else 0.0
        got = float(delta[index])
        if abs(got) > LEDGER_TOLERANCE:
            found.append(client)
        if abs(got - want) <= LEDGER_TOLERANCE:
            continue
        if client in expected and abs(got) <= LEDGER_TOLERANCE:
            lost.append(client)
            problems.append(f"{client}: update missing from the aggregate (lost)")
        elif client not in expected:
            problems.append(f"{client}: update in the aggregate but not expected")
        else:
            problems.append(
                f"{client}: aggregate weight {got:.6g}, expected {want:.6g}"
            )
    return found, lost, problems


def check_slots(
    selected: Sequence[str], statuses: Mapping[str, str], failing: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """Each selected client's slot against its plan: fail if planted, else ok.

    Returns the planted failures seen, the unexpected failures and a sentence
    per discrepancy (a planted fault that did not fail is one as well).
    """
    planted, unexpected, problems = [], [], []
    for client in selected:
        status = statuses.get(client, "no outcome")
        if client in failing:
            if status == "ok":
                problems.append(f"{client}: set to fail, but its slot was ok")
            else:
                planted.append(client)
        elif status != "ok":
            unexpected.append(client)
            problems.append(f"{client}: slot {status}, and no fault was planted")
    return planted, unexpected, problems


def check_served(
    selected: Sequence[str], served_by: Mapping[str, int], planted: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Envoy must have sent one request to each selected client and no other.

    A client whose planted failure was seen may have had none: after a few 5xx
    in a row Envoy's outlier detection ejects it and answers 503 itself.
    Returns those ejected clients and a sentence per discrepancy.
    """
    ejected, problems = [], []
    for client in selected:
        count = served_by.get(client, 0)
        if count == 0 and client in planted:
            ejected.append(client)
        elif count != 1:
            problems.append(f"{client}: Envoy sent it {count} requests, expected 1")
    for client in sorted(set(served_by) - set(selected)):
        problems.append(
            f"{client}: Envoy sent it {served_by[client]} requests, "
            "but it was not selected"
        )
    return ejected, problems


# ------------------------------------------------------------------- rounds


class LedgerTracker:
    """Arms rounds through the round API and checks each one after aggregation.

    ``arm`` and ``report`` are the mesh grid's callbacks; ``evaluated`` is the
    strategy's ``evaluate_fn``, which receives the new global model.
    """

    def __init__(
        self,
        api: RoundAPIClient,
        stats: EnvoyStatsSource,
        controller: Controller,
        settings: LoadSettings,
    ) -> None:
        self._api = api
        self._stats = stats
        self._controller = controller
        self._settings = settings
        self._examples = {c: examples_of(i) for i, c in enumerate(settings.client_ids)}
        self._ledger: np.ndarray | None = None
        self._payload: np.ndarray | None = None
        self._started = 0.0
        self._before: Snapshot | None = None
        self._served_by: dict[str, int] = {}
        self._outcomes: list[SlotOutcome] = []
        self.rounds: list[RoundCheck] = []

    def arm(self, server_round: int) -> ArmedRound:
        self._started = time.monotonic()
        armed = self._api.arm(server_round)
        self._before = self._stats.snapshot()
        return armed

    def report(self, server_round: int, outcomes: list[SlotOutcome]) -> None:
        self._served_by = self._stats.served_by(self._before, self._stats.snapshot())
        self._outcomes = list(outcomes)
        self._api.report(server_round, outcomes)

    def evaluated(self, server_round: int, arrays: ArrayRecord) -> None:
        """Check the round that produced ``arrays`` (round 0: keep the start)."""
        ledger = arrays[load_client_app.LEDGER].numpy()
        payload = arrays[load_client_app.PAYLOAD].numpy()
        if server_round > 0:
            intact = np.allclose(payload, self._payload, rtol=PAYLOAD_RTOL)
            self.rounds.append(self._check(server_round, ledger - self._ledger, intact))
        self._ledger, self._payload = ledger, payload

    def _check(
        self, server_round: int, delta: np.ndarray, payload_intact: bool
    ) -> RoundCheck:
        record = next(
            r for r in self._controller.records if r.server_round == server_round
        )
        assignment = self._controller.assignment(server_round)
        statuses = {
            assignment[o.slot]: o.status for o in self._outcomes if o.slot in assignment
        }
        selected = record.selected
        failing = self._settings.failing
        expected = {c: self._examples[c] for c in selected if c not in failing}
        found, lost, aggregate_problems = check_aggregate(
            delta, self._settings.client_ids, expected
        )
        planted, unexpected, slot_problems = check_slots(selected, statuses, failing)
        ejected, served_problems = check_served(selected, self._served_by, planted)
        problems = aggregate_problems + slot_problems + served_problems
        if not payload_intact:
            problems.append("the aggregated payload differs from the one sent")
        check = RoundCheck(
            server_round=server_round,
            selected=tuple(selected),
            statuses=statuses,
            served_by=dict(self._served_by),
            aggregated=tuple(found),
            lost=tuple(lost),
            unexpected_failures=tuple(unexpected),
            planted_failures=tuple(planted),
            ejected=tuple(ejected),
            problems=tuple(problems),
            wall_s=time.monotonic() - self._started,
            arm_s=record.apply_s,
            served_waits_s=tuple(record.served_waits_s),
        )
        for problem in problems:
            log.error("round %d: %s", server_round, problem)
        return check


# -------------------------------------------------------------------- result


@dataclass(frozen=True)
class LoadResult:
    """One load run: its timings, its checks and the mesh's counters."""

    settings: LoadSettings
    start_s: float
    rounds_s: float
    rounds: tuple[RoundCheck, ...]
    envoy_counters: Mapping[str, int]
    memory_kib: Mapping[str, int]
    ready_probe_s: tuple[float, ...] = ()  # the controller's readiness probes

    @property
    def lost_updates(self) -> int:
        return sum(len(r.lost) for r in self.rounds)

    @property
    def sent(self) -> int:
        return sum(len(r.statuses) for r in self.rounds)

    @property
    def served(self) -> int:
        return sum(sum(r.served_by.values()) for r in self.rounds)

    @property
    def failed(self) -> int:
        return sum(sum(s != "ok" for s in r.statuses.values()) for r in self.rounds)

    @property
    def planted_failures(self) -> int:
        return sum(len(r.planted_failures) for r in self.rounds)

    @property
    def unexpected_failures(self) -> int:
        return sum(len(r.unexpected_failures) for r in self.rounds)

    @property
    def ejected(self) -> int:
        return sum(len(r.ejected) for r in self.rounds)

    def expected_counters(self) -> dict[str, int]:
        """What Envoy must have counted, given the failures planted and seen."""
        return {
            "no_route": 0,
            "no_cluster": 0,
            "unarmed_slot": 0,
            "no_healthy": self.ejected,
            "downstream_5xx": self.planted_failures,
            # Envoy charges its own 503 for an ejected client to that cluster.
            "upstream_5xx": self.planted_failures,
        }

    @property
    def mesh_problems(self) -> list[str]:
        """Envoy's counters against the run: mesh-made failures only by ejection."""
        return [
            f"Envoy {name}={self.envoy_counters.get(name)}, expected {want} "
            f"({self.planted_failures} planted failures, {self.ejected} ejected)"
            for name, want in self.expected_counters().items()
            if self.envoy_counters.get(name) != want
        ]

    @property
    def ok(self) -> bool:
        """No problem in any round and none in Envoy's counters."""
        return not self.mesh_problems and not any(r.problems for r in self.rounds)

    @property
    def rounds_per_min(self) -> float:
        return 60.0 * len(self.rounds) / self.rounds_s

    def problems(self) -> list[str]:
        """Every discrepancy found, each naming its round or its counter."""
        found = [
            f"round {r.server_round}: {p}" for r in self.rounds for p in r.problems
        ]
        return found + self.mesh_problems


# ----------------------------------------------------------------------- run


@dataclass(frozen=True)
class ClientServices:
    """Started client services and how long they took to become ready."""

    settings: LoadSettings
    workloads: LocalWorkloads
    start_s: float


@contextlib.contextmanager
def client_services(settings: LoadSettings, work_dir: Path) -> Iterator[ClientServices]:
    """Start one process per client and wait until all are ready; stop all on exit."""
    settings.check()
    with LocalWorkloads(work_dir / "logs") as workloads:
        started = time.monotonic()
        with _app_importable():
            workloads.start(client_specs(settings))
        workloads.wait_ready(timeout_s=settings.ready_timeout_s)
        yield ClientServices(settings, workloads, time.monotonic() - started)


@contextlib.contextmanager
def _app_importable() -> Iterator[None]:
    """Let the client processes started meanwhile import ``load_client_app``."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), previous]))
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def run_rounds(services: ClientServices, work_dir: Path) -> LoadResult:
    """Run the settings' rounds over these services; a fresh mesh and controller."""
    settings, workloads = services.settings, services.workloads
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(
            LocalMesh(work_dir=work_dir / "envoy", routing_dir=work_dir / "routing")
        )
        stats = EnvoyStatsSource(mesh.admin_url)
        stack.callback(stats.close)
        probe_s: list[float] = []
        ready = _timed(lambda: workloads.ready(settings.client_ids), probe_s)
        controller = _controller(settings, mesh, workloads, stats, ready, work_dir)
        token = secrets.token_urlsafe(32)
        api_server = RoundAPIServer(controller, token=token).start()
        stack.callback(api_server.stop)
        api = RoundAPIClient(api_server.url, per_round=settings.per_round, token=token)
        stack.callback(api.close)
        tracker = LedgerTracker(api, stats, controller, settings)
        grid = MeshGrid(
            mesh_url=mesh.listen_url,
            arm=tracker.arm,
            report=tracker.report,
            deadline_s=settings.deadline_s,
        )
        stack.callback(grid.close)

        started = time.monotonic()
        _fedavg().start(
            grid=grid,
            initial_arrays=load_client_app.initial_arrays(
                settings.clients, settings.payload_floats
            ),
            num_rounds=settings.rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=tracker.evaluated,
        )
        rounds_s = time.monotonic() - started
        counters = envoy_counters(mesh.admin_url, ENVOY_STATS)
        memory = client_memory_kib(os.getpid())
    return LoadResult(
        settings=settings,
        start_s=services.start_s,
        rounds_s=rounds_s,
        rounds=tuple(tracker.rounds),
        envoy_counters=counters,
        memory_kib=memory,
        ready_probe_s=tuple(probe_s),
    )


def _controller(
    settings: LoadSettings,
    mesh: LocalMesh,
    workloads: LocalWorkloads,
    stats: EnvoyStatsSource,
    ready: Callable[[], list[str]],
    work_dir: Path,
) -> Controller:
    """The controller as the demo wires it: Envoy telemetry, a routing directory."""
    policy, document = policies.resolve(settings.policy)
    ids = settings.client_ids
    backend = DirectoryBackend(
        work_dir / "routing", on_change=_pusher(mesh, workloads.workloads)
    )
    return Controller(
        clients=ids,
        policy=policy,
        telemetry=stats,
        backend=backend,
        wait=lambda step: _wait_served(mesh, step),
        ready=ready,
        window_s=(document and document.telemetry_window_s) or settings.window_s,
        seed=settings.seed,
    )


def _timed(call: Callable[[], list[str]], seconds: list[float]):
    """``call``, appending the seconds each call takes to ``seconds``."""

    def timed() -> list[str]:
        started = time.monotonic()
        try:
            return call()
        finally:
            seconds.append(time.monotonic() - started)

    return timed


def _fedavg() -> FedAvg:
    """Flower's FedAvg training every armed slot, evaluating on the server only."""
    return FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
    )


def _pusher(mesh: LocalMesh, workloads: Sequence) -> Callable[[str, dict], None]:
    """The backend's ``on_change``: serve each written object from Envoy."""

    def push(kind: str, obj: dict) -> None:
        if kind == "DestinationRule":
            mesh.apply_destination_rule(obj, workloads)
        else:
            mesh.apply_virtual_service(obj)

    return push


def _wait_served(mesh: LocalMesh, step: Step) -> float:
    version = step.obj["metadata"]["annotations"][protocol.ROUTING_VERSION_ANNOTATION]
    kind = "clusters" if step.kind == "DestinationRule" else "routes"
    return mesh.wait_served(kind, version, timeout_s=10.0)


def run(settings: LoadSettings, work_dir: Path) -> LoadResult:
    """Start the services, run the rounds, stop everything."""
    with client_services(settings, work_dir) as services:
        return run_rounds(services, work_dir)


# ------------------------------------------------------------ measurements


def envoy_counters(admin_url: str, patterns: Mapping[str, str]) -> dict[str, int]:
    """Envoy's counters summed per name, each over the stats its regex matches."""
    try:
        text = httpx.get(f"{admin_url}/stats", timeout=5.0).text
    except httpx.HTTPError as exc:
        raise LoadCheckError(f"cannot read Envoy's stats at {admin_url}") from exc
    compiled = {name: re.compile(pattern) for name, pattern in patterns.items()}
    totals = dict.fromkeys(patterns, 0)
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        for name, pattern in compiled.items():
            if pattern.match(key) and value.isdigit():
                totals[name] += int(value)
    return totals


def client_memory_kib(parent_pid: int) -> dict[str, int]:
    """Summed memory of the client service processes that ``parent_pid`` started.

    ``peak_rss`` sums each process's peak resident set (VmHWM), which counts the
    pages they share once per process; ``pss`` sums their proportional set size
    now, which shares those pages out.
    """
    peak, pss, count = 0, 0, 0
    for pid in _client_pids(parent_pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        peak += _kib(status, "VmHWM")
        pss += _kib(rollup, "Pss")
        count += 1
    return {"processes": count, "peak_rss": peak, "pss": pss}


def _client_pids(parent_pid: int) -> list[int]:
    """Children of ``parent_pid`` running a client service."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent_pid and b"meshctl.flower.clientservice" in cmdline:
            pids.append(int(entry.name))
    return pids


def _kib(text: str, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -------------------------------------------------------------------- report


def summary(result: LoadResult) -> dict[str, float]:
    """The figures printed for one run, by name."""
    walls = [r.wall_s for r in result.rounds]
    arms = [r.arm_s for r in result.rounds]
    waits = [w for r in result.rounds for w in r.served_waits_s]
    memory = result.memory_kib
    return {
        "start_s": result.start_s,
        "rounds_per_min": result.rounds_per_min,
        "round_p50_s": percentile(walls, 0.5),
        "round_p95_s": percentile(walls, 0.95),
        "arm_p50_s": percentile(arms, 0.5),
        "arm_p95_s": percentile(arms, 0.95),
        "served_wait_p50_s": percentile(waits, 0.5),
        "served_wait_p95_s": percentile(waits, 0.95),
        "ready_probe_p50_s": percentile(result.ready_probe_s, 0.5),
        "client_peak_rss_mib": memory["peak_rss"] / 1024,
        "client_pss_mib": memory["pss"] / 1024,
        "peak_rss_per_client_mib": memory["peak_rss"]
        / 1024
        / max(1, memory["processes"]),
    }


def report_lines(result: LoadResult, baseline: LoadResult | None) -> list[str]:
    """The human report: figures with ratios to the baseline, then the checks."""
    s = result.settings
    lines = [
        f"load: N={s.clients} client services, K={s.per_round} per round, "
        f"R={len(result.rounds)} rounds, policy {s.policy}, "
        f"{len(s.failing)} set to fail"
        + (f" (baseline N={baseline.settings.clients})" if baseline else "")
    ]
    figures = summary(result)
    base = summary(baseline) if baseline else {}
    for name, value in figures.items():
        ratio = f"  x{value / base[name]:.2f} vs baseline" if base.get(name) else ""
        lines.append(f"  {name:24} {value:10.3f}{ratio}")
    lines += [
        f"  requests sent {result.sent}, served (Envoy) {result.served}, "
        f"failed {result.failed} (planted {result.planted_failures}, of which "
        f"{result.ejected} answered by Envoy after ejection; "
        f"unexpected {result.unexpected_failures})",
        f"  lost updates {result.lost_updates}",
        "  Envoy counters: "
        + ", ".join(f"{k}={v}" for k, v in result.envoy_counters.items()),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the baseline, then the load; print both; 1 when a check failed."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Flower logs every round on its own handler; the grid warns of every
        # failed slot, which the checks count and compare with the plan.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("meshctl.grid").setLevel(logging.ERROR)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    settings = LoadSettings(
        clients=args.clients,
        per_round=args.per_round,
        rounds=args.rounds,
        policy=args.policy,
        failing=spread_clients(args.clients, args.failing_clients),
        seed=args.seed,
    )
    baseline_settings = LoadSettings(
        clients=args.baseline_clients,
        per_round=min(args.per_round, args.baseline_clients),
        rounds=args.rounds,
        policy=args.policy,
        failing=spread_clients(args.baseline_clients, args.failing_clients),
        seed=args.seed,
    )
    try:
        settings.check()
        if args.baseline_clients > 0:
            baseline_settings.check()
    except ValueError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="meshctl-load-") as tmp:
        baseline = None
        if args.baseline_clients > 0:
            baseline = run(baseline_settings, Path(tmp) / "baseline")
            print("\n".join(report_lines(baseline, None)))
        result = run(settings, Path(tmp) / "load")
        print("\n".join(report_lines(result, baseline)))
    problems = result.problems() + (baseline.problems() if baseline else [])
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="N (default 50)")
    parser.add_argument("--per-round", type=int, default=10, help="K (default 10)")
    parser.add_argument("--rounds", type=int, default=30, help="R (default 30)")
    parser.add_argument(
        "--policy", default="random", help="a policy name or file (default random)"
    )
    parser.add_argument(
        "--failing-clients",
        type=int,
        default=2,
        help="clients whose ClientApp always fails, spread over N (default 2)",
    )
    parser.add_argument(
        "--baseline-clients",
        type=int,
        default=20,
        help="N of the baseline run with the same K and R; 0 skips it (default 20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("-v", "--verbose", action="store_true", help="INFO logs")
    return parser


if __name__ == "__main__":
    sys.exit(main())
