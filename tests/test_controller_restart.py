"""A controller that restarts takes up its saved state and the live routes.

Each test arms rounds with one controller, drops it, and builds a new one on
the same state file and routing directory, as a restarted process would.
"""

from __future__ import annotations

import json
import logging
import random
import time

import pytest

from meshctl import policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.controller.roundapi import RoundAPIClient, RoundAPIServer
from meshctl.controller.state import ControllerStateError
from meshctl.policies import Selection, SelectionInput
from meshctl.routing import render
from meshctl.routing.hysteresis import Hysteresis
from meshctl.types import ClientState, ClientTelemetry, SlotOutcome

CLIENTS = [protocol.client_id(i) for i in range(8)]


class RoundTelemetry:
    """Telemetry that changes with the round, the same for every controller."""

    def __init__(self) -> None:
        self.server_round = 1
        self.fail = False

    def read(self, window_s: float) -> dict[str, ClientTelemetry]:
        if self.fail:
            raise ConnectionError("stats endpoint down")
        return {
            client: ClientTelemetry(
                client=client,
                state=ClientState.OBSERVED,
                requests=10,
                error_ratio=0.0,
                latency_p95_ms=100.0 + (i * 37 + self.server_round * 53) % 400,
            )
            for i, client in enumerate(CLIENTS)
        }


class ScriptedPolicy:
    """Chooses what the test scripted for each round."""

    name = "scripted"

    def __init__(self, script: dict[int, tuple[str, ...]]) -> None:
        self.script = script

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        return Selection(clients=self.script[given.server_round])


class RecordingBackend(DirectoryBackend):
    """The directory backend, keeping each plan with the objects it started from."""

    def __init__(self, routing_dir) -> None:
        super().__init__(routing_dir)
        self.plans: list[tuple[tuple, list]] = []

    def apply_plan(self, steps, wait):
        self.plans.append((self.read(), list(steps)))
        return super().apply_plan(steps, wait)


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "routing", tmp_path / "controller-state.json"


def _controller(paths, policy="random", *, telemetry=None, backend=None, **options):
    routing_dir, state_path = paths
    return Controller(
        clients=CLIENTS,
        policy=policies.create(policy) if isinstance(policy, str) else policy,
        telemetry=telemetry or RoundTelemetry(),
        backend=backend or DirectoryBackend(routing_dir),
        wait=lambda step: 0.0,
        ready=lambda: CLIENTS,
        seed=7,
        state_path=state_path,
        **options,
    )


def _outcomes(assignment, server_round) -> list[SlotOutcome]:
    """Each slot's outcome, told by the client behind it: the map matters."""
    outcomes = []
    for slot, client in sorted(assignment.items()):
        i = CLIENTS.index(client)
        outcomes.append(
            SlotOutcome(
                server_round=server_round,
                slot=slot,
                status="timeout" if i % 5 == 4 else "ok",
                duration_s=1.0 + i * 0.7 + server_round * 0.1,
                num_examples=100 * (i + 1),
                train_loss=0.2 + 0.13 * i + 0.01 * server_round,
            )
        )
    return outcomes


def _armed_twice(paths, policy="random", **options) -> Controller:
    """Rounds 1 and 2 armed, feedback of round 1 given: round 2 is in flight."""
    controller = _controller(paths, policy, **options)
    controller.arm(1, 3)
    controller.record_feedback(1, _outcomes(controller.assignment(1), 1))
    controller.arm(2, 3)
    return controller


def _routing_files(routing_dir) -> dict[str, tuple[bytes, int, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(routing_dir.iterdir())
    }


def _history(controller) -> dict[str, list]:
    return {c: list(f) for c, f in controller._history.items() if f}


# --- what a restart keeps ---------------------------------------------------------


def test_feedback_of_the_round_in_flight_reaches_its_clients_after_a_restart(
    paths,
) -> None:
    before = _armed_twice(paths)
    in_flight = before.assignment(2)
    del before

    restarted = _controller(paths)
    feedback = restarted.record_feedback(2, _outcomes(in_flight, 2))

    assert restarted.assignment(2) == in_flight
    assert [(f.client, f.outcome.slot) for f in feedback] == [
        (client, slot) for slot, client in sorted(in_flight.items())
    ]


def test_a_restarted_controller_has_the_saved_history_and_rounds(paths) -> None:
    before = _armed_twice(paths)
    history = _history(before)
    rounds = [(r.server_round, r.selected, r.routing_version) for r in before.records]
    del before

    restarted = _controller(paths)

    assert _history(restarted) == history
    assert [
        (r.server_round, r.selected, r.routing_version) for r in restarted.records
    ] == rounds


def test_a_restart_alone_writes_no_route(paths) -> None:
    routing_dir, _ = paths
    before = _armed_twice(paths)
    files = _routing_files(routing_dir)
    del before

    restarted = _controller(paths)

    assert _routing_files(routing_dir) == files
    assert [r.server_round for r in restarted.records] == [1, 2]


def test_without_telemetry_after_a_restart_the_round_keeps_the_live_routes(
    paths,
) -> None:
    routing_dir, _ = paths
    before = _armed_twice(paths)
    live_version = before.records[-1].routing_version
    files = _routing_files(routing_dir)
    del before
    telemetry = RoundTelemetry()
    telemetry.fail = True

    restarted = _controller(paths, telemetry=telemetry)
    armed = restarted.arm(3, 3)

    assert armed.routing_version == live_version
    assert restarted.assignment(3) == restarted.assignment(2)
    assert _routing_files(routing_dir) == files


def test_the_first_round_after_a_restart_moves_the_routes_make_before_break(
    paths,
) -> None:
    routing_dir, _ = paths
    script = {1: CLIENTS[0:3], 2: CLIENTS[1:4], 3: CLIENTS[4:7]}
    before = _controller(paths, ScriptedPolicy(script))
    before.arm(1, 3)
    old = before.arm(2, 3)
    del before
    backend = RecordingBackend(routing_dir)

    restarted = _controller(paths, ScriptedPolicy(script), backend=backend)
    armed = restarted.arm(3, 3)

    assert armed.routing_version not in (old.routing_version, "")
    assert [r.server_round for r in restarted.records] == [1, 2, 3]
    ((live_vs, live_dr), steps) = backend.plans[-1]
    assert [s.kind for s in steps] == [
        "DestinationRule",
        "VirtualService",
        "DestinationRule",
    ]
    vs, dr = live_vs, live_dr
    for step in steps:  # every referenced subset exists after every step
        vs, dr = (step.obj, dr) if step.kind == "VirtualService" else (vs, step.obj)
        assert _referenced(vs) <= _subsets(dr), step.reason
    assert _referenced(live_vs) <= _subsets(steps[0].obj)


def _referenced(vs) -> set[str]:
    slots, weights = render.routed_clients(vs)
    return set(slots.values()) | {c for c, w in weights.items() if w > 0}


def _subsets(dr) -> set[str]:
    return {s["name"] for s in dr["spec"].get("subsets", [])}


def test_the_hysteresis_dwell_holds_the_live_routes_across_a_restart(paths) -> None:
    routing_dir, _ = paths
    script = {1: CLIENTS[0:3], 2: CLIENTS[3:6], 3: CLIENTS[3:6]}
    before = _controller(
        paths, ScriptedPolicy(script), hysteresis=Hysteresis(min_dwell_s=3600)
    )
    before.arm(1, 3)
    before.arm(2, 3)  # held: the routes of round 1 are younger than the dwell
    files = _routing_files(routing_dir)
    del before

    restarted = _controller(
        paths, ScriptedPolicy(script), hysteresis=Hysteresis(min_dwell_s=3600)
    )
    restarted.arm(3, 3)

    assert restarted.records[-1].selected == tuple(CLIENTS[0:3])
    assert _routing_files(routing_dir) == files


@pytest.mark.parametrize("policy", ["oort", "pyramidfl", "mesh", "power-of-choice"])
def test_a_policy_chooses_after_a_restart_as_if_there_was_none(
    tmp_path, policy
) -> None:
    def run(controller, telemetry, rounds, *, feedback_first=False):
        for server_round in rounds:
            if not feedback_first:
                telemetry.server_round = server_round
                controller.arm(server_round, 3)
            assignment = controller.assignment(server_round)
            controller.record_feedback(
                server_round, _outcomes(assignment, server_round)
            )
            feedback_first = False

    def paths_in(name):
        return tmp_path / name / "routing", tmp_path / name / "state.json"

    telemetry = RoundTelemetry()
    uninterrupted = _controller(paths_in("once"), policy, telemetry=telemetry)
    run(uninterrupted, telemetry, range(1, 9))

    telemetry = RoundTelemetry()
    before = _controller(paths_in("twice"), policy, telemetry=telemetry)
    run(before, telemetry, range(1, 4))
    telemetry.server_round = 4
    before.arm(4, 3)  # round 4 is in flight at the restart
    del before
    restarted = _controller(paths_in("twice"), policy, telemetry=telemetry)
    run(restarted, telemetry, range(4, 9), feedback_first=True)

    assert [r.selected for r in restarted.records] == [
        r.selected for r in uninterrupted.records
    ]
    assert vars(restarted.policy) == vars(uninterrupted.policy)


def test_the_saved_history_keeps_the_last_outcomes_of_each_client(paths) -> None:
    _, state_path = paths
    script = dict.fromkeys(range(1, 5), tuple(CLIENTS[0:3]))
    controller = _controller(paths, ScriptedPolicy(script), history_limit=2)
    for server_round in range(1, 5):
        controller.arm(server_round, 3)
        controller.record_feedback(
            server_round, _outcomes(controller.assignment(server_round), server_round)
        )

    saved = json.loads(state_path.read_text())["history"]

    assert {c: [o["server_round"] for o in saved[c]] for c in saved} == dict.fromkeys(
        CLIENTS[0:3], [3, 4]
    )


def test_another_policy_keeps_the_history_but_not_the_memory(paths, caplog) -> None:
    history = _history(_armed_twice(paths, "oort"))

    with caplog.at_level(logging.WARNING, logger="meshctl.controller"):
        restarted = _controller(paths, "mesh")

    assert _history(restarted) == history
    assert restarted.policy._estimates.clients == []
    assert "saved with policy oort" in caplog.text


# --- a state file that cannot be used ---------------------------------------------


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set(field_name, value):
    def edit(path) -> None:
        document = json.loads(path.read_text())
        target = document
        *parents, last = field_name.split(".")
        for key in parents:
            target = target[key]
        target[last] = value
        path.write_text(json.dumps(document))

    return edit


@pytest.mark.parametrize(
    ("corrupt", "field_name"),
    [
        pytest.param(_truncate, "(file)", id="truncated"),
        pytest.param(
            lambda p: p.write_bytes(b"\x00\xff garbage"), "(file)", id="bytes"
        ),
        pytest.param(_set("version", 99), "version", id="other-version"),
        pytest.param(_set("kind", "something"), "kind", id="other-kind"),
        pytest.param(_set("slots.2", ["c-00"]), "slots.2", id="bad-slots"),
        pytest.param(_set("rng", [3, [1, 2], None]), "rng", id="bad-rng"),
        pytest.param(_set("hysteresis.age_s", "old"), "hysteresis.age_s", id="bad-age"),
    ],
)
def test_an_unusable_state_file_is_refused_naming_the_file_and_field(
    paths, corrupt, field_name
) -> None:
    _, state_path = paths
    _armed_twice(paths)
    corrupt(state_path)

    with pytest.raises(ControllerStateError) as raised:
        _controller(paths)

    assert str(state_path) in str(raised.value)
    assert raised.value.field == field_name
    assert field_name in str(raised.value)


MESH_MEMORY = "policy.memory._estimates"


@pytest.mark.parametrize(
    ("column", "value", "field_name"),
    [
        pytest.param("items", ["fast"], "latency_level", id="not-numbers"),
        pytest.param("items", [True], "latency_level", id="booleans"),
        pytest.param("dtype", "<U4", "latency_level", id="strings"),
        pytest.param("items", None, "latency_level", id="no-items"),
    ],
)
def test_a_malformed_column_of_mesh_memory_is_named(
    paths, column, value, field_name
) -> None:
    _, state_path = paths
    _armed_twice(paths, "mesh")
    document = json.loads(state_path.read_text())
    document["policy"]["memory"]["_estimates"]["fields"][field_name][column] = value
    state_path.write_text(json.dumps(document))

    with pytest.raises(ControllerStateError) as raised:
        _controller(paths, "mesh")

    assert raised.value.field == f"{MESH_MEMORY}.{field_name}"


@pytest.mark.parametrize(
    ("column", "change", "says"),
    [
        pytest.param(
            "utility",
            lambda c: {**c, "items": [1.0]},
            "utility must hold one value per client",
            id="short-column",
        ),
        pytest.param(
            "rested_until",
            lambda c: {**c, "dtype": "<f8"},
            "rested_until must hold int64, not float64",
            id="rounds-as-floats",
        ),
    ],
)
def test_mesh_memory_that_does_not_fit_is_relearnt_from_the_history(
    paths, caplog, column, change, says
) -> None:
    _, state_path = paths
    history = _history(_armed_twice(paths, "mesh"))
    document = json.loads(state_path.read_text())
    fields = document["policy"]["memory"]["_estimates"]["fields"]
    fields[column] = change(fields[column])
    state_path.write_text(json.dumps(document))

    with caplog.at_level(logging.WARNING, logger="meshctl.controller"):
        restarted = _controller(paths, "mesh")

    assert _history(restarted) == history
    assert restarted.policy._estimates.clients == []
    assert says in caplog.text


def test_a_bad_outcome_in_the_history_is_named(paths) -> None:
    _, state_path = paths
    _armed_twice(paths)
    document = json.loads(state_path.read_text())
    client = next(iter(document["history"]))
    del document["history"][client][0]["status"]
    state_path.write_text(json.dumps(document))

    with pytest.raises(ControllerStateError, match=rf"history\.{client}\[0\]\.status"):
        _controller(paths)


def test_discarding_a_bad_state_file_starts_fresh_and_keeps_it_aside(
    paths, caplog
) -> None:
    routing_dir, state_path = paths
    _armed_twice(paths)
    _truncate(state_path)
    files = _routing_files(routing_dir)

    with caplog.at_level(logging.WARNING, logger="meshctl.controller"):
        fresh = _controller(paths, discard_bad_state=True)

    assert fresh.records == [] and _history(fresh) == {}
    assert not state_path.exists()
    assert len(list(state_path.parent.glob("controller-state.json.rejected-*"))) == 1
    assert "starts fresh" in caplog.text
    assert _routing_files(routing_dir) == files


def test_live_routes_edited_by_hand_win_over_the_saved_round(paths, caplog) -> None:
    routing_dir, _ = paths
    script = {1: CLIENTS[0:3], 2: CLIENTS[3:6], 3: CLIENTS[5:8]}

    def hold() -> Hysteresis:
        return Hysteresis(min_dwell_s=3600)

    _controller(paths, ScriptedPolicy(script), hysteresis=hold()).arm(1, 3)
    # Someone applies other routes by hand, without the controller knowing.
    by_hand = _controller(
        (routing_dir, routing_dir.parent / "other-state.json"), ScriptedPolicy(script)
    )
    by_hand.arm(2, 3)
    files = _routing_files(routing_dir)

    with caplog.at_level(logging.WARNING, logger="meshctl.controller"):
        restarted = _controller(paths, ScriptedPolicy(script), hysteresis=hold())
    restarted.arm(3, 3)  # the dwell holds the live routes, not the saved ones

    assert restarted.assignment(1) == dict(enumerate(CLIENTS[0:3], start=1))
    assert restarted.records[-1].selected == tuple(CLIENTS[3:6])
    assert _routing_files(routing_dir) == files
    assert "the live routes win" in caplog.text


# --- through the round API --------------------------------------------------------


def test_the_round_api_client_keeps_working_across_a_controller_restart(
    paths,
) -> None:
    controller = _controller(paths)
    server = RoundAPIServer(controller).start()
    port = int(server.url.rsplit(":", 1)[1])
    client = RoundAPIClient(server.url, per_round=3)
    try:
        client.arm(1)
        client.report(1, _outcomes(controller.assignment(1), 1))
        client.arm(2)
        in_flight = controller.assignment(2)
        server.stop()
        del controller, server

        restarted = _controller(paths)
        server = RoundAPIServer(restarted, port=port).start()
        client.report(2, _outcomes(in_flight, 2))
        armed = client.arm(3)
    finally:
        client.close()
        server.stop()

    last_heard = {c: f[-1].outcome.server_round for c, f in restarted._history.items()}
    assert last_heard.items() >= {c: 2 for c in in_flight.values()}.items()
    assert armed.routing_version == restarted.records[-1].routing_version


# --- meshctl run: the cluster loop ------------------------------------------------


def test_a_restarted_cluster_loop_takes_the_feedback_of_the_round_in_flight(
    fake_kube, kubeconfig, tmp_path
) -> None:
    from meshctl.backends.cluster import ClusterBackend
    from meshctl.controller import loop
    from meshctl.kube import client as kube
    from tests import cluster_support as cs

    for pod in ("fl-clients-0", "fl-clients-1", "fl-clients-2"):
        cs.put_pod(fake_kube, "fl", pod)
    cs.deploy_routing(fake_kube, "fl")
    settings = loop.LoopSettings(
        listen=("127.0.0.1", 0),
        settle_s=0.0,
        round_api_token=None,
        state_path=tmp_path / "controller-state.json",
    )

    def started() -> loop.ControllerLoop:
        backend = ClusterBackend(kube.Api(kube.connect(kubeconfig)), namespace="fl")
        running = loop.ControllerLoop(
            backend, RoundTelemetry(), policies.create("random"), settings
        ).start()
        deadline = time.monotonic() + 10
        while not running.ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        return running

    first = started()
    try:
        api = RoundAPIClient(first.url, per_round=2)
        api.arm(1)
        in_flight = first.controller.assignment(1)
        api.close()
    finally:
        first.stop()
    live = cs.live(fake_kube, "fl", "VirtualService")

    second = started()
    try:
        api = RoundAPIClient(second.url, per_round=2)
        api.report(1, _outcomes_of(in_flight, 1))
        api.close()
        history = _history(second.controller)
    finally:
        second.stop()

    assert sorted(history) == sorted(in_flight.values())
    assert cs.live(fake_kube, "fl", "VirtualService") == live


def _outcomes_of(assignment, server_round) -> list[SlotOutcome]:
    return [
        SlotOutcome(server_round=server_round, slot=slot, status="ok", duration_s=1.0)
        for slot in sorted(assignment)
    ]


def test_meshctl_run_refuses_a_bad_state_file_naming_it(
    fake_kube, kubeconfig, tmp_path
) -> None:
    from typer.testing import CliRunner

    from meshctl import cli

    state_path = tmp_path / "controller-state.json"
    state_path.write_text('{"kind": "meshctl-controller-state", "version": 0}')

    result = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--prometheus-url",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--state-file",
            str(state_path),
            "--kubeconfig",
            str(kubeconfig),
            "-n",
            "fl",
        ],
    )

    assert result.exit_code == 4, result.output
    unwrapped = "".join(result.output.split())  # the console wraps long lines
    assert f"{state_path}:version:" in unwrapped


def test_a_state_file_that_cannot_be_written_stops_the_controller_at_start(
    tmp_path,
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(ControllerStateError, match="cannot write in"):
        _controller((tmp_path / "routing", blocker / "state.json"))
