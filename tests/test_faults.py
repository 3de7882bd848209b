"""The fault spec of ``meshctl demo --faults`` and the injector that carries it out."""

from __future__ import annotations

import threading
import time

import pytest

from meshctl import faults
from meshctl.faults import Fault, FaultSpecError

CLIENTS = [f"c-{i:02d}" for i in range(6)]


def test_the_example_of_the_help_parses_into_two_faults() -> None:
    parsed = faults.parse("crash:c-03@2,slow:c-05x10@1", CLIENTS, rounds=5)
    assert parsed == (
        Fault("crash", 2, "c-03", None, 1),
        Fault("slow", 1, "c-05", 10.0),
    )
    assert [str(f) for f in parsed] == ["crash:c-03@2+1", "slow:c-05x10@1"]


def test_every_kind_parses() -> None:
    spec = (
        "crash:c-00@1+3, fail:c-01x0.5@2, nan:c-02@1, shape:c-03@2, "
        "oversized:c-04@3, envoy-restart@2, controller-restart@3"
    )
    parsed = faults.parse(spec, CLIENTS, rounds=4)
    assert [f.kind for f in parsed] == [
        "crash",
        "fail",
        "nan",
        "shape",
        "oversized",
        "envoy-restart",
        "controller-restart",
    ]
    assert parsed[0].down_rounds == 3 and parsed[1].factor == 0.5
    assert faults.parse("", CLIENTS, rounds=4) == ()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("crash:c-09@2", "no client 'c-09'"),
        ("crash:c-01@0", "round 0 is not between 1 and --rounds (4)"),
        ("crash:c-01@5", "round 5 is not between 1"),
        ("melt:c-01@2", "unknown kind 'melt'"),
        ("slow:c-01@2", "slow needs xFACTOR"),
        ("slow:c-01x0.5@2", "1x to 1000x slower, not 0.5x"),
        ("slow:c-01x-2@2", "1x to 1000x slower, not -2x"),
        ("slow:c-01x1e400@2", "not infx"),
        ("slow:c-01xnan@2", "not nanx"),
        ("fail:c-01x.5.5@2", "factor '.5.5' is not a number"),
        ("crash:c-01@1,,nan:c-02@2", "item 2 is empty"),
        ("fail:c-01x1.5@2", "must be in (0, 1]"),
        ("nan:c-01x2@2", "nan takes no xFACTOR"),
        ("nan:c-01@2+1", "only crash takes +ROUNDS"),
        ("crash:c-01@2+0", "at least one round"),
        ("envoy-restart:c-01@2", "takes only a round"),
        ("crash@2", "crash needs a client"),
        ("crash:c-01", "expected KIND:CLIENT@ROUND"),
        ("nan:c-01@1,shape:c-01@3", "overlap"),
        ("envoy-restart@2,envoy-restart@2", "overlap"),
    ],
)
def test_a_bad_item_is_named_with_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(FaultSpecError) as caught:
        faults.parse(spec, CLIENTS, rounds=4)
    assert says in str(caught.value)
    assert "--faults item" in str(caught.value)


def test_a_share_written_without_its_zero_is_a_share() -> None:
    (fault,) = faults.parse("fail:c-01x.5@2", CLIENTS, rounds=4)
    assert fault.factor == 0.5


def test_node_config_carries_only_the_clients_own_faults() -> None:
    parsed = faults.parse(
        "crash:c-01@2,slow:c-01x4@3,oversized:c-02@1,fail:c-03x0.25@2",
        CLIENTS,
        rounds=4,
    )
    assert faults.node_config(parsed, "c-01", oversized_bytes=99) == {
        "crash-in-round": 2,
        "slow-factor": 4.0,
        "slow-from-round": 3,
    }
    assert faults.node_config(parsed, "c-02", oversized_bytes=99) == {
        "reply-fault": "oversized",
        "reply-fault-round": 1,
        "oversized-bytes": 99,
    }
    assert faults.node_config(parsed, "c-03", oversized_bytes=99) == {
        "fail-rate": 0.25,
        "fail-from-round": 2,
    }
    assert faults.node_config(parsed, "c-04", oversized_bytes=99) == {}


class Recorder:
    """Fault actions that write down what they were asked to do."""

    def __init__(self, restart_s: float = 0.0) -> None:
        self.calls: list[tuple[str, str]] = []
        self._restart_s = restart_s
        self._lock = threading.Lock()

    def _note(self, action: str, target: str = "") -> None:
        with self._lock:
            self.calls.append((action, target))

    def actions(self) -> faults.FaultActions:
        def restart(what: str) -> None:
            time.sleep(self._restart_s)
            self._note(what)

        return faults.FaultActions(
            kill_client=lambda name: self._note("kill", name),
            restart_client=lambda name: self._note("restart", name),
            restart_envoy=lambda: restart("envoy"),
            restart_controller=lambda: restart("controller"),
        )


def test_a_routed_client_crashes_by_itself_and_comes_back_after_its_rounds() -> None:
    recorder = Recorder()
    injector = faults.FaultInjector(
        faults.parse("crash:c-01@2+2", CLIENTS, 6), recorder.actions(), mid_round_s=0
    )
    for server_round in range(1, 6):
        injector.armed(server_round, ["c-01", "c-02"])
        injector.settle(server_round)
        injector.evaluated(server_round)
        if server_round < 4:
            assert recorder.calls == []  # routed in round 2: its own app crashes
    assert recorder.calls == [("restart", "c-01")]  # after rounds 3 and 4
    assert [e["round"] for e in injector.events] == [2, 2]


def test_an_unrouted_client_is_killed_when_its_crash_round_is_armed() -> None:
    recorder = Recorder()
    injector = faults.FaultInjector(
        faults.parse("crash:c-04@1", CLIENTS, 3), recorder.actions(), mid_round_s=0
    )
    injector.armed(1, ["c-01"])
    assert recorder.calls == [("kill", "c-04")]
    injector.evaluated(1)
    assert recorder.calls == [("kill", "c-04")]
    injector.evaluated(2)
    assert recorder.calls == [("kill", "c-04"), ("restart", "c-04")]


def test_a_mesh_restart_lands_inside_its_round_before_the_report() -> None:
    recorder = Recorder(restart_s=0.05)
    injector = faults.FaultInjector(
        faults.parse("envoy-restart@2,controller-restart@2", CLIENTS, 3),
        recorder.actions(),
        mid_round_s=0.1,
    )
    injector.armed(1, ["c-01"])
    injector.settle(1)
    assert recorder.calls == []
    injector.armed(2, ["c-01"])
    assert recorder.calls == []  # not before the middle of the round
    injector.settle(2)  # the report waits for both restarts
    assert sorted(recorder.calls) == [("controller", ""), ("envoy", "")]
    assert all(e["took_s"] >= 0.05 for e in injector.events)


def test_every_fault_is_in_the_events_of_its_round() -> None:
    spec = "slow:c-01x4@1,fail:c-02x0.25@2,nan:c-03@2,crash:c-04@1"
    injector = faults.FaultInjector(
        faults.parse(spec, CLIENTS, 3), Recorder().actions(), mid_round_s=0
    )
    for server_round in (1, 2):
        injector.armed(server_round, ["c-04"])
        injector.evaluated(server_round)
    injector.close()

    whats = {e["fault"]: e["what"] for e in injector.events}
    assert whats["slow:c-01x4@1"] == "c-01 computes 4x slower from now"
    assert whats["fail:c-02x0.25@2"] == "c-02 fails 25% of its requests from now"
    assert whats["nan:c-03@2"] == "c-03's reply carries NaN weights"
    assert {e["round"] for e in injector.events} == {1, 2}


def test_a_restart_not_yet_due_is_dropped_when_the_run_ends() -> None:
    recorder = Recorder()
    injector = faults.FaultInjector(
        faults.parse("envoy-restart@1", CLIENTS, 2),
        recorder.actions(),
        mid_round_s=30.0,
    )
    injector.armed(1, ["c-01"])
    started = time.monotonic()

    injector.close()  # an interrupted run unwinding

    assert recorder.calls == [] and injector.events == []
    assert time.monotonic() - started < 5.0


def test_a_fault_that_fails_to_land_is_reported_and_the_run_goes_on() -> None:
    def broken() -> None:
        raise RuntimeError("no such process")

    actions = faults.FaultActions(
        kill_client=lambda name: None,
        restart_client=lambda name: None,
        restart_envoy=broken,
        restart_controller=lambda: None,
    )
    injector = faults.FaultInjector(
        faults.parse("envoy-restart@1", CLIENTS, 2), actions, mid_round_s=0
    )
    injector.armed(1, [])
    injector.evaluated(1)
    (event,) = injector.events
    assert "FAILED (no such process)" in event["what"]
