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
import math
import secrets
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from meshctl import faults, policies, protocol, report, scenarios
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller, RoundRecord
from meshctl.controller.roundapi import RoundAPIClient, RoundAPIServer
from meshctl.flower.grid import MeshGrid
from meshctl.localmesh.envoy import EnvoyError, LocalMesh
from meshctl.localmesh.prometheus import (
    LocalPrometheus,
    PrometheusProcessError,
    find_prometheus,
)
from meshctl.localmesh.workloads import ClientSpec, LocalWorkloads, WorkloadError
from meshctl.routing.plan import Step
from meshctl.telemetry import localprom, score
from meshctl.telemetry import prometheus as promsource
from meshctl.telemetry.envoystats import EnvoyStatsSource
from meshctl.telemetry.prometheus import PrometheusSource
from meshctl.types import ArmedRound, SlotOutcome

log = logging.getLogger("meshctl.demo")

CLIENT_APP = "fl_app.client_app:app"
TELEMETRY_SOURCES = ("envoy", "prometheus")
DEVICE_TRACE = "fedscale"  # the data set the devices' speeds come from
# The largest training reply the server reads: the model is about 60 KB, so a
# reply this large is a broken or hostile client.
MAX_REPLY_BYTES = 8 * 1024 * 1024
STATE_FILE = "state.json"  # the controller's, under <work dir>/controller/
# When a restart of Envoy or the controller comes after a round is armed: the
# training requests are all in flight by then (local training alone takes
# longer), so the restart lands under them.
MID_ROUND_S = 0.5


class SettingsError(ValueError):
    """Settings that looked right but that the data or the machine cannot meet."""


# Failures of the local mesh's own processes: Envoy, the client services and a
# local Prometheus.
MESH_ERRORS = (EnvoyError, WorkloadError, PrometheusProcessError)


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on; the report repeats it."""

    clients: int = 20
    per_round: int = 5
    rounds: int = 15
    policy: str = "mesh"  # a policy name or the path of a SelectionPolicy file
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
    out_dir: Path | None = None  # checked early; the caller writes the report
    target: float = 0.97
    window_s: float = 30.0
    telemetry: str = "envoy"  # envoy (its admin stats) or prometheus (PromQL)
    prometheus_url: str | None = None  # None with prometheus: start one locally
    scrape_interval: str = "1s"  # of the Prometheus the demo starts
    scenario: str = "static"  # scenarios.NAMES: who fails, slows down, joins late
    faults: str = ""  # a fault spec (meshctl.faults): crashes, restarts, bad replies

    def check(self) -> None:
        """Raise ``ValueError`` naming the option that cannot work."""
        if self.clients < 1:
            raise ValueError("--clients must be at least 1")
        if not 1 <= self.per_round <= self.clients:
            raise ValueError("--per-round must be between 1 and --clients")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        for option, value in (
            ("--time-scale", self.time_scale),
            ("--deadline-s", self.deadline_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{option} ({value}) must be a positive number")
        if not 0 <= self.failing_clients <= self.clients:
            raise ValueError(
                f"--failing-clients ({self.failing_clients}) must be between 0 and "
                f"--clients ({self.clients})"
            )
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"--fail-rate ({self.fail_rate}) must be between 0 and 1")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"--target ({self.target}) must be in (0, 1]")
        # A name or a SelectionPolicy file: UnknownPolicy names the valid ones,
        # PolicyDocumentError gives each problem's file, line and field.
        policies.resolve(self.policy)
        self.fault_list()  # FaultSpecError names the item
        scenarios.get(self.scenario)  # UnknownScenario names the valid ones
        if self.telemetry not in TELEMETRY_SOURCES:
            raise ValueError(
                f"--telemetry must be one of {', '.join(TELEMETRY_SOURCES)}, "
                f"not {self.telemetry!r}"
            )
        if self.prometheus_url and self.telemetry != "prometheus":
            raise ValueError("--prometheus-url needs --telemetry prometheus")
        if self.prometheus_url:
            promsource.check_url(self.prometheus_url)
        if self.telemetry == "prometheus" and not self.prometheus_url:
            try:
                find_prometheus()
            except PrometheusProcessError as exc:
                raise ValueError(f"--telemetry prometheus: {exc}") from exc
        # Directories last among the options: nothing is created for a run
        # that another option stops.
        for option, path in (("--work-dir", self.work_dir), ("--out", self.out_dir)):
            if path is not None:
                _check_writable_dir(option, path)
        if self.work_dir is not None:
            _check_state_path(self.work_dir / "controller" / STATE_FILE)
        # The data last: a directory that cannot be read stops the run here,
        # before any process starts (fl_app.data.DataError names the path).
        from fl_app import data  # the case study, behind the face

        if self.dataset not in data.DATASET_NAMES:
            raise ValueError(
                f"--dataset must be one of {', '.join(data.DATASET_NAMES)}, "
                f"not {self.dataset!r}"
            )
        data.check_readable(self.dataset, self.data_dir)
        data.check_readable(DEVICE_TRACE, self.data_dir)

    def fault_list(self) -> tuple[faults.Fault, ...]:
        """The faults of ``--faults``, parsed and checked against the run."""
        ids = [protocol.client_id(i) for i in range(self.clients)]
        return faults.parse(self.faults, ids, self.rounds)


def _check_writable_dir(option: str, path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is, or can become, a writable directory.

    Checked before any process starts, so that a bad path costs no training.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: {exc.strerror or exc}") from exc


class ControllerHost:
    """The controller and the round API server in front of it.

    :meth:`restart` stops both and starts a new controller from the state the
    old one wrote, behind a new server on the same port: the FL server keeps
    its URL, and the routes stay as they are.
    """

    def __init__(self, make_controller: Callable[[], Controller], token: str) -> None:
        self._make_controller = make_controller
        self._token = token
        self.controller = make_controller()
        self._server = RoundAPIServer(self.controller, token=token).start()
        self.restarts = 0

    @property
    def url(self) -> str:
        return self._server.url

    def restart(self) -> None:
        """Replace the controller; when the new one cannot start, the old stays."""
        controller = self._make_controller()  # reads the state the old one wrote
        port = int(self._server.url.rsplit(":", 1)[1])
        self._server.stop()
        self.controller = controller
        self._server = RoundAPIServer(controller, port=port, token=self._token).start()
        self.restarts += 1

    def stop(self) -> None:
        self._server.stop()


def _check_state_path(path: Path) -> None:
    """Raise ``ValueError`` unless the controller can write its state at ``path``.

    A state file of an earlier run in the same work directory is removed when
    the run starts; something else at that path would stop the run late.
    """
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--work-dir: {path.parent} must be a directory, not a file")
    if path.exists() and not path.is_file():
        raise ValueError(f"--work-dir: {path} must be the controller's state file")


class RoundTracker:
    """Follows each round through the grid: Envoy's counts, times, metrics."""

    def __init__(
        self,
        api: RoundAPIClient,
        stats: EnvoyStatsSource,
        host: ControllerHost,
        time_scale: float,
        on_round: Callable[[report.RoundReport], None],
        injector: faults.FaultInjector,
    ) -> None:
        self._api = api
        self._stats = stats
        self._host = host
        self._time_scale = time_scale
        self._on_round = on_round
        self._injector = injector
        self._started = time.monotonic()
        self._emulated_s = 0.0
        self._current: dict = {}
        self.rounds: list[report.RoundReport] = []
        # The controller's record of each round as it was armed: a controller
        # restarted later recovers its rounds without their telemetry.
        self.records: list[RoundRecord] = []
        self.server_round = 0  # the round being armed or run

    def arm(self, server_round: int) -> ArmedRound:
        self.server_round = server_round
        round_started = time.monotonic()
        armed = self._api.arm(server_round)
        controller = self._host.controller
        record = next(
            r for r in reversed(controller.records) if r.server_round == server_round
        )
        self._current = {
            "armed": armed,
            "record": record,
            "assignment": dict(controller.assignment(server_round)),
            "started": round_started,
            "before": self._stats.snapshot(),
        }
        self._injector.armed(server_round, record.selected)
        return armed

    def report(self, server_round: int, outcomes: list[SlotOutcome]) -> None:
        # A restart of this round is over before Envoy is read or the controller
        # hears of the outcomes.
        self._injector.settle(server_round)
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
        assignment, record = current["assignment"], current["record"]
        round_emulated = self._round_emulated_s(current["outcomes"])
        self._emulated_s += round_emulated
        now = time.monotonic()
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
        self.records.append(record)
        self._host.controller.metrics.round_evaluated(
            server_round,
            entry.metrics,
            round_s=entry.round_wall_s,
            slot_statuses=[o.status for o in current["outcomes"]],
        )
        self._on_round(entry)
        self._injector.evaluated(server_round)

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
    """One client service per shard, with its device and its fault schedule."""
    plans = client_schedules(settings, devices)
    fault_list = settings.fault_list()
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
                    "time-scale": settings.time_scale,
                    "seed": settings.seed * 1000 + index,
                    **plans[index].node_config(),
                    **faults.node_config(
                        fault_list,
                        protocol.client_id(index),
                        oversized_bytes=2 * MAX_REPLY_BYTES,
                    ),
                },
            )
        )
    return specs


def client_schedules(settings: DemoSettings, devices) -> list[scenarios.ClientSchedule]:
    """Each client's faults and joining round under the settings' scenario."""
    return scenarios.schedule(
        scenarios.get(settings.scenario),
        ms_per_sample=[device.compute_ms_per_sample for device in devices],
        rounds=settings.rounds,
        failing_clients=settings.failing_clients,
        fail_rate=settings.fail_rate,
        seed=settings.seed,
    )


# The settings a client pool fixes: its processes were started with them.
POOL_FIELDS = (
    "clients",
    "dataset",
    "seed",
    "data_dir",
    "rounds",
    "time_scale",
    "failing_clients",
    "fail_rate",
    "scenario",
    "faults",
)


@dataclass(frozen=True)
class ClientPool:
    """The FL clients of a run: their data, fault schedules and services.

    A pool outlives a run when a bench gives the same pool to every policy:
    the client services keep no state between requests but their data, and
    each run brings its own Envoy and controller, so no run sees another's
    routes or telemetry.
    """

    settings: DemoSettings
    fed: object  # fl_app.data.FederatedData
    plans: tuple[scenarios.ClientSchedule, ...]
    workloads: LocalWorkloads

    def ready(self, server_round: int) -> list[str]:
        """Clients whose service is ready and whose scenario has them joined.

        A late joiner's service runs from the start but reports no readiness
        until its round, as a pod that is not Ready yet: the controller routes
        only ready clients, so no request reaches it before then.
        """
        joined = [
            protocol.client_id(p.index) for p in self.plans if p.present(server_round)
        ]
        return self.workloads.ready(joined)

    def check(self, settings: DemoSettings) -> None:
        """Raise ``ValueError`` when ``settings`` need other client services."""
        for name in POOL_FIELDS:
            if getattr(settings, name) != getattr(self.settings, name):
                raise ValueError(
                    f"the client pool was started with {name}="
                    f"{getattr(self.settings, name)!r}, not {getattr(settings, name)!r}"
                )


@contextlib.contextmanager
def client_pool(settings: DemoSettings, work_dir: Path) -> Iterator[ClientPool]:
    """Split the data, start every client service; stop them all on exit.

    Returns without waiting for readiness: ``pool.workloads.wait_ready()``.
    """
    from fl_app import data, devices  # the case study, behind the face

    # Data first: a missing dataset should stop the run before any process starts.
    # A split or a trace too small for --clients is the user's setting to change.
    try:
        fed = data.prepare_federated(
            settings.dataset,
            settings.clients,
            seed=settings.seed,
            data_dir=settings.data_dir,
        )
        profiles = devices.assign_devices(
            settings.clients, settings.seed, data_dir=settings.data_dir
        )
    except data.DataError:
        raise
    except ValueError as exc:
        raise SettingsError(f"--clients {settings.clients}: {exc}") from exc
    shard_paths = []
    for index, x in enumerate(fed.clients):
        path = work_dir / "data" / f"{protocol.client_id(index)}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        data.save_client_shard(path, x)
        shard_paths.append(path)
    log.info(
        "data: %s, %d clients (%d to %d rows), %d labelled on the server, %d test rows",
        settings.dataset,
        settings.clients,
        min(fed.client_sizes),
        max(fed.client_sizes),
        len(fed.server_y),
        len(fed.test_y),
    )
    plans = tuple(client_schedules(settings, profiles))
    for line in scenarios.describe(plans):
        log.info("scenario %s: %s", settings.scenario, line)
    with LocalWorkloads(work_dir / "logs") as workloads:
        workloads.start(client_specs(settings, shard_paths, profiles))
        yield ClientPool(settings, fed, plans, workloads)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
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
    pool: ClientPool | None = None,
) -> dict:
    """Run the whole demo and return the report as a dict.

    Without a ``pool`` the run starts its own client services and stops them
    at the end; with one it uses the pool's and leaves them running.
    """
    from fl_app import server_app  # the case study, behind the face

    settings.check()
    if pool is not None:
        pool.check(settings)
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        work_dir = settings.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="meshctl-demo-"))
        )
        started = time.monotonic()

        # The client services (the data first) and the mesh in front of them.
        if pool is None:
            pool = stack.enter_context(client_pool(settings, work_dir))
        fed, workloads = pool.fed, pool.workloads
        mesh = stack.enter_context(
            LocalMesh(
                work_dir=work_dir / "envoy",
                routing_dir=work_dir / "routing",
                workloads=workloads.workloads,
            )
        )
        # Prometheus scrapes first about 5 s after it starts: start it while
        # the client services load.
        prometheus = _prometheus_source(stack, settings, work_dir, mesh, workloads)
        ready_s = workloads.wait_ready()
        log.info("%d client services ready in %.1fs", len(workloads.workloads), ready_s)

        # The controller, reached by the server through its round API.  It
        # writes its state beside the routes, so that a new one takes over.
        policy, document = policies.resolve(settings.policy)
        window_s = (document and document.telemetry_window_s) or settings.window_s
        stats = EnvoyStatsSource(mesh.admin_url)
        stack.callback(stats.close)
        backend = DirectoryBackend(
            work_dir / "routing",
            on_change=lambda kind, obj: _push(mesh, kind, obj, workloads),
        )

        def make_controller() -> Controller:
            return Controller(
                clients=[protocol.client_id(i) for i in range(settings.clients)],
                policy=policy,
                telemetry=prometheus or stats,
                backend=backend,
                wait=lambda step: _wait_served(mesh, step),
                # The tracker exists by the time the controller asks who is ready.
                ready=lambda: pool.ready(tracker.server_round),
                window_s=window_s,
                seed=settings.seed,
                state_path=work_dir / "controller" / STATE_FILE,
            )

        # A run starts afresh: the state of an earlier run in the same work
        # directory is not this run's.  Only a restart within the run reads it.
        (work_dir / "controller" / STATE_FILE).unlink(missing_ok=True)
        # A fresh round API token per run: only this run's FL server may arm.
        token = secrets.token_urlsafe(32)
        host = ControllerHost(make_controller, token)
        stack.callback(host.stop)
        if prometheus is not None:
            localprom.write_targets(
                work_dir / "prometheus" / "targets",
                controller=host.url.removeprefix("http://"),
            )
        api = RoundAPIClient(host.url, per_round=settings.per_round, token=token)
        stack.callback(api.close)

        deadline_wall_s = settings.deadline_s * settings.time_scale
        injector = faults.FaultInjector(
            settings.fault_list(),
            faults.FaultActions(
                kill_client=workloads.kill,
                restart_client=workloads.restart,
                restart_envoy=mesh.restart,
                restart_controller=host.restart,
            ),
            mid_round_s=min(deadline_wall_s / 4, MID_ROUND_S),
        )
        stack.callback(injector.close)
        tracker = RoundTracker(
            api, stats, host, settings.time_scale, on_round, injector
        )
        grid = MeshGrid(
            mesh_url=mesh.listen_url,
            arm=tracker.arm,
            report=tracker.report,
            deadline_s=deadline_wall_s,
            max_reply_bytes=MAX_REPLY_BYTES,
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
        result = report_of(
            settings, tracker.rounds, wall_total_s=time.monotonic() - started
        )
        result["telemetry"] = {
            "source": settings.telemetry,
            "prometheus_url": prometheus.url if prometheus else None,
            "rounds": [
                {"round": r.server_round, "clients": score.rows(r.telemetry)}
                for r in tracker.records
            ],
        }
        if injector.faults:
            result["faults"] = {
                "spec": settings.faults,
                "events": list(injector.events),
                "controller_restarts": host.restarts,
                "envoy_pid": mesh.pid,
            }
        return result


def report_of(
    settings: DemoSettings,
    rounds: list[report.RoundReport],
    *,
    wall_total_s: float | None = None,
    interrupted: bool = False,
) -> dict:
    """The report of a run, or of the rounds an interrupted run finished."""
    result = report.build(
        settings={
            "policy": settings.policy,
            "dataset": settings.dataset,
            "clients": settings.clients,
            "per_round": settings.per_round,
            "seed": settings.seed,
            "settings": _jsonable(settings),
            "client_ids": [protocol.client_id(i) for i in range(settings.clients)],
        },
        rounds=rounds,
        target=settings.target,
    )
    result["wall_total_s"] = None if wall_total_s is None else round(wall_total_s, 2)
    if interrupted:
        result["interrupted"] = True
    return result


def _prometheus_source(
    stack: contextlib.ExitStack,
    settings: DemoSettings,
    work_dir: Path,
    mesh: LocalMesh,
    workloads: LocalWorkloads,
) -> PrometheusSource | None:
    """With ``--telemetry prometheus``: a Prometheus scraping this run, and its
    reader; the local one is started here and stopped with the demo."""
    if settings.telemetry != "prometheus":
        return None
    prom_dir = work_dir / "prometheus"
    targets_dir = prom_dir / "targets"
    localprom.write_targets(
        targets_dir,
        envoy_admin=mesh.admin_url.removeprefix("http://"),
        workloads=workloads.workloads,
    )
    url = settings.prometheus_url
    if url is None:
        config = localprom.file_sd_config(
            targets_dir, scrape_interval=settings.scrape_interval
        )
        url = stack.enter_context(LocalPrometheus(prom_dir, config)).url
    else:
        jobs = prom_dir / "scrape-configs.yml"
        jobs.write_text(
            yaml.safe_dump(
                {"scrape_configs": localprom.file_sd_scrape_configs(targets_dir)},
                sort_keys=False,
            )
        )
        log.warning(
            "Prometheus at %s must scrape this run: add the jobs of %s to its "
            "config; they read their targets from %s, which this run rewrites",
            url,
            jobs,
            targets_dir,
        )
    source = PrometheusSource(
        url, fresh_scrape_jobs=(localprom.ENVOY_JOB, localprom.CLIENTS_JOB)
    )
    stack.callback(source.close)
    log.info("telemetry: production PromQL from Prometheus at %s", url)
    return source


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
