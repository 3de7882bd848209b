"""The main job on the embedded mesh: federated training selected by routing.

One command starts everything on this machine: a client service per FL client,
a real Envoy in front of them, the controller with its round API, and the FL
server running an unmodified Flower strategy over the mesh grid.  Every round the
controller chooses the clients and rewrites the routes; Envoy's own counters then
say which clients served the round, and the report keeps both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from meshctl import policies, protocol, report
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.controller.roundapi import RoundAPIClient, RoundAPIServer
from meshctl.flower.grid import MeshGrid
from meshctl.localmesh.envoy import LocalMesh
from meshctl.localmesh.workloads import ClientSpec, LocalWorkloads
from meshctl.routing.plan import Step
from meshctl.telemetry.envoystats import EnvoyStatsSource
from meshctl.types import ArmedRound, SlotOutcome

log = logging.getLogger("meshctl.demo")

CLIENT_APP = "fl_app.client_app:app"


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on; the report repeats it."""

    clients: int = 20
    per_round: int = 5
    rounds: int = 15
    policy: str = "mesh"
    dataset: str = "ton_iot"
    seed: int = 0
    data_dir: Path | None = None
    work_dir: Path | None = None
    time_scale: float = 0.003  # wall seconds per emulated second
    deadline_s: float = 2400.0  # emulated seconds a round waits for its clients
    local_steps: int = 100
    batch_size: int = 64
    learning_rate: float = 3e-3
    failing_clients: int = 2
    fail_rate: float = 0.5
    target: float = 0.95
    window_s: float = 30.0

    def check(self) -> None:
        """Raise ``ValueError`` naming the option that cannot work."""
        if self.clients < 1:
            raise ValueError("--clients must be at least 1")
        if not 1 <= self.per_round <= self.clients:
            raise ValueError("--per-round must be between 1 and --clients")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.time_scale <= 0 or self.deadline_s <= 0:
            raise ValueError("--time-scale and --deadline-s must be positive")
        if not 0 <= self.failing_clients <= self.clients:
            raise ValueError("--failing-clients must be between 0 and --clients")
        policies.create(self.policy)  # raises UnknownPolicy with the valid names


class RoundTracker:
    """Follows each round through the grid: Envoy's counts, times, metrics."""

    def __init__(
        self,
        api: RoundAPIClient,
        stats: EnvoyStatsSource,
        controller: Controller,
        time_scale: float,
        on_round: Callable[[report.RoundReport], None],
    ) -> None:
        self._api = api
        self._stats = stats
        self._controller = controller
        self._time_scale = time_scale
        self._on_round = on_round
        self._started = time.monotonic()
        self._emulated_s = 0.0
        self._current: dict = {}
        self.rounds: list[report.RoundReport] = []

    def arm(self, server_round: int) -> ArmedRound:
        round_started = time.monotonic()
        armed = self._api.arm(server_round)
        self._current = {
            "armed": armed,
            "started": round_started,
            "before": self._stats.snapshot(),
        }
        return armed

    def report(self, server_round: int, outcomes: list[SlotOutcome]) -> None:
        after = self._stats.snapshot()
        self._current["served_by"] = self._stats.served_by(
            self._current["before"], after
        )
        self._current["outcomes"] = outcomes
        self._api.report(server_round, outcomes)

    def evaluated(self, server_round: int, metrics: dict[str, float]) -> None:
        """Close the round once the server has evaluated its model."""
        if server_round == 0 or not self._current:
            return
        current, self._current = self._current, {}
        assignment = self._controller.assignment(server_round)
        round_emulated = self._round_emulated_s(current["outcomes"])
        self._emulated_s += round_emulated
        now = time.monotonic()
        record = next(
            r for r in self._controller.records if r.server_round == server_round
        )
        entry = report.RoundReport(
            round=server_round,
            selected=list(record.selected),
            routing_version=current["armed"].routing_version,
            served_by=dict(sorted(current["served_by"].items())),
            emulated_s=round(self._emulated_s, 3),
            wall_s=round(now - self._started, 3),
            round_emulated_s=round(round_emulated, 3),
            round_wall_s=round(now - current["started"], 3),
            routing_apply_s=round(record.apply_s, 4),
            routing_served_s=[round(w, 4) for w in record.served_waits_s],
            metrics={k: round(float(v), 6) for k, v in metrics.items()},
            failed={
                assignment[o.slot]: f"{o.status}: {o.reason}"
                for o in current["outcomes"]
                if o.status != "ok" and o.slot in assignment
            },
            scores={c: round(v, 4) for c, v in sorted(record.scores.items())},
        )
        self.rounds.append(entry)
        self._on_round(entry)

    def _round_emulated_s(self, outcomes: list[SlotOutcome]) -> float:
        """A synchronous round lasts as long as its slowest slot."""
        durations = [
            o.emulated_s
            if o.emulated_s is not None
            else o.duration_s / self._time_scale
            for o in outcomes
        ]
        return max(durations, default=0.0)


def client_specs(
    settings: DemoSettings, shard_paths: list[Path], devices
) -> list[ClientSpec]:
    """One client service per shard, with its device and its failure rate."""
    rng = random.Random(settings.seed)
    failing = set(rng.sample(range(settings.clients), settings.failing_clients))
    specs = []
    for index, (path, device) in enumerate(zip(shard_paths, devices, strict=True)):
        specs.append(
            ClientSpec(
                name=protocol.client_id(index),
                app=CLIENT_APP,
                node_id=index + 1,
                node_config={
                    "data-path": str(path),
                    "ms-per-sample": device.compute_ms_per_sample,
                    "kbps": device.bandwidth_kbps,
                    "fail-rate": settings.fail_rate if index in failing else 0.0,
                    "time-scale": settings.time_scale,
                    "seed": settings.seed * 1000 + index,
                },
            )
        )
    return specs


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so every started process is stopped."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    settings: DemoSettings,
    on_round: Callable[[report.RoundReport], None] = lambda entry: None,
) -> dict:
    """Run the whole demo and return the report as a dict."""
    from fl_app import data, devices, server_app  # the case study, behind the face

    settings.check()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_as_interrupt())
        work_dir = settings.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="meshctl-demo-"))
        )
        started = time.monotonic()

        # Data first: a missing dataset should stop the run before any process starts.
        fed = data.prepare_federated(
            settings.dataset,
            settings.clients,
            seed=settings.seed,
            data_dir=settings.data_dir,
        )
        profiles = devices.assign_devices(
            settings.clients, settings.seed, data_dir=settings.data_dir
        )
        shard_paths = []
        for index, x in enumerate(fed.clients):
            path = work_dir / "data" / f"{protocol.client_id(index)}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            data.save_client_shard(path, x)
            shard_paths.append(path)
        log.info(
            "data: %s, %d clients (%d to %d rows), %d labelled on the server, "
            "%d test rows",
            settings.dataset,
            settings.clients,
            min(fed.client_sizes),
            max(fed.client_sizes),
            len(fed.server_y),
            len(fed.test_y),
        )

        # The client services and the mesh in front of them.
        workloads = stack.enter_context(LocalWorkloads(work_dir / "logs"))
        workloads.start(client_specs(settings, shard_paths, profiles))
        mesh = stack.enter_context(
            LocalMesh(work_dir=work_dir / "envoy", routing_dir=work_dir / "routing")
        )
        ready_s = workloads.wait_ready()
        log.info("%d client services ready in %.1fs", settings.clients, ready_s)

        # The controller, reached by the server through its round API.
        stats = EnvoyStatsSource(mesh.admin_url)
        stack.callback(stats.close)
        backend = DirectoryBackend(
            work_dir / "routing",
            on_change=lambda kind, obj: _push(mesh, kind, obj, workloads),
        )
        controller = Controller(
            clients=[protocol.client_id(i) for i in range(settings.clients)],
            policy=policies.create(settings.policy),
            telemetry=stats,
            backend=backend,
            wait=lambda step: _wait_served(mesh, step),
            ready=workloads.ready,
            window_s=settings.window_s,
            seed=settings.seed,
        )
        api_server = RoundAPIServer(controller).start()
        stack.callback(api_server.stop)
        api = RoundAPIClient(api_server.url, per_round=settings.per_round)
        stack.callback(api.close)

        tracker = RoundTracker(api, stats, controller, settings.time_scale, on_round)
        grid = MeshGrid(
            mesh_url=mesh.listen_url,
            arm=tracker.arm,
            report=tracker.report,
            deadline_s=settings.deadline_s * settings.time_scale,
        )
        stack.callback(grid.close)
        server_app.run(
            grid,
            fed,
            server_app.TrainingConfig(
                num_rounds=settings.rounds,
                local_steps=settings.local_steps,
                batch_size=settings.batch_size,
                learning_rate=settings.learning_rate,
                seed=settings.seed,
            ),
            on_evaluate=tracker.evaluated,
        )
        result = report.build(
            settings={
                "policy": settings.policy,
                "dataset": settings.dataset,
                "clients": settings.clients,
                "per_round": settings.per_round,
                "seed": settings.seed,
                "settings": _jsonable(settings),
                "client_ids": list(controller.clients),
                "wall_total_s": None,
            },
            rounds=tracker.rounds,
            target=settings.target,
        )
        result["wall_total_s"] = round(time.monotonic() - started, 2)
        return result


def _push(mesh: LocalMesh, kind: str, obj: dict, workloads: LocalWorkloads) -> None:
    if kind == "DestinationRule":
        mesh.apply_destination_rule(obj, workloads.workloads)
    else:
        mesh.apply_virtual_service(obj)


def _wait_served(mesh: LocalMesh, step: Step) -> float:
    version = step.obj["metadata"]["annotations"][protocol.ROUTING_VERSION_ANNOTATION]
    kind = "clusters" if step.kind == "DestinationRule" else "routes"
    return mesh.wait_served(kind, version, timeout_s=10.0)


def _jsonable(settings: DemoSettings) -> dict:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(settings).items()
    }
