"""Hysteresis: oscillating scores do not make the routes flap."""

from __future__ import annotations

import math
import random

import pytest

from meshctl import protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.policies import Selection, SelectionInput
from meshctl.routing.hysteresis import Hysteresis

CLIENTS = [protocol.client_id(i) for i in range(6)]
A = ("c-00", "c-01")
B = ("c-02", "c-03")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class OscillatingPolicy:
    """Scores that flip between two sets each round: A leads, then B, then A..."""

    name = "oscillating"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        a_leads = given.server_round % 2 == 1
        a, b = (self.high, self.low) if a_leads else (self.low, self.high)
        scores = {c: a for c in A} | {c: b for c in B}
        scores |= {c: 0.0 for c in given.candidates if c not in scores}
        return Selection(clients=A if a_leads else B, scores=scores)


def _controller(tmp_path, policy, hysteresis=None) -> Controller:
    return Controller(
        clients=CLIENTS,
        policy=policy,
        telemetry=type("NoTelemetry", (), {"read": lambda self, w: {}})(),
        backend=DirectoryBackend(tmp_path / "routing"),
        wait=lambda step: 0.0,
        ready=lambda: CLIENTS,
        hysteresis=hysteresis,
    )


def _route_changes(controller: Controller) -> int:
    versions = [r.routing_version for r in controller.records]
    return sum(
        1 for old, new in zip(versions, versions[1:], strict=False) if old != new
    )


# --- through the controller --------------------------------------------------


def test_without_hysteresis_oscillating_scores_flap_the_routes(tmp_path) -> None:
    controller = _controller(tmp_path, OscillatingPolicy(1.0, 1.05))

    for server_round in range(1, 11):
        controller.arm(server_round, 2)

    assert _route_changes(controller) == 9


def test_a_small_oscillation_under_the_minimum_gain_never_moves_the_routes(
    tmp_path,
) -> None:
    hysteresis = Hysteresis(min_gain=0.1)
    controller = _controller(tmp_path, OscillatingPolicy(1.0, 1.05), hysteresis)

    for server_round in range(1, 11):
        controller.arm(server_round, 2)

    assert _route_changes(controller) == 0
    assert all(r.selected == A for r in controller.records)
    assert "under the 10% minimum" in controller.records[-1].routing_note


def test_a_large_oscillation_moves_the_routes_at_most_once_per_dwell(
    tmp_path,
) -> None:
    clock = FakeClock()
    hysteresis = Hysteresis(min_gain=0.1, min_dwell_s=5.0, clock=clock)
    controller = _controller(tmp_path, OscillatingPolicy(1.0, 3.0), hysteresis)

    changed_at = []
    for server_round in range(1, 21):
        before = controller.records[-1].routing_version if controller.records else None
        controller.arm(server_round, 2)
        if before is not None and controller.records[-1].routing_version != before:
            changed_at.append(clock.now_s)
        clock.now_s += 1.0

    assert len(changed_at) >= 2
    assert all(b - a >= 5.0 for a, b in zip(changed_at, changed_at[1:], strict=False))
    assert len(changed_at) <= 20 // 5


# --- the rules one by one ----------------------------------------------------


def test_the_first_selection_is_taken() -> None:
    decision = Hysteresis(min_gain=1.0, min_dwell_s=60).decide(A, {}, ready=CLIENTS)

    assert decision.clients == A
    assert not decision.held


def test_the_same_clients_in_another_order_keep_their_slots() -> None:
    hysteresis = Hysteresis()
    hysteresis.commit(("c-00", "c-01", "c-02"))

    decision = hysteresis.decide(("c-02", "c-00", "c-01"), {}, ready=CLIENTS)

    assert decision.clients == ("c-00", "c-01", "c-02")


def test_a_change_waits_for_the_dwell_time() -> None:
    clock = FakeClock()
    hysteresis = Hysteresis(min_dwell_s=30, clock=clock)
    hysteresis.commit(A)

    clock.now_s += 29
    held = hysteresis.decide(B, {}, ready=CLIENTS)
    clock.now_s += 1
    moved = hysteresis.decide(B, {}, ready=CLIENTS)

    assert (held.clients, held.held) == (A, True)
    assert "under the 30 s dwell" in held.reason
    assert (moved.clients, moved.held) == (B, False)


@pytest.mark.parametrize(
    ("live_score", "new_score", "moves"),
    [(1.0, 1.09, False), (1.0, 1.1, True), (0.0, 0.5, True), (1.0, 0.5, False)],
    ids=["gain-9%", "gain-10%", "from-zero", "loss"],
)
def test_a_change_needs_the_minimum_score_gain(
    live_score: float, new_score: float, moves: bool
) -> None:
    hysteresis = Hysteresis(min_gain=0.1)
    hysteresis.commit(A)
    scores = {c: live_score for c in A} | {c: new_score for c in B}

    decision = hysteresis.decide(B, scores, ready=CLIENTS)

    assert decision.clients == (B if moves else A)


def test_unscored_clients_are_judged_by_the_dwell_time_only() -> None:
    clock = FakeClock()
    hysteresis = Hysteresis(min_gain=0.5, min_dwell_s=10, clock=clock)
    hysteresis.commit(A)
    clock.now_s += 10
    scores = {"c-00": 1.0, "c-01": 1.0, "c-02": math.nan, "c-03": 0.1}

    decision = hysteresis.decide(B, scores, ready=CLIENTS)

    assert decision.clients == B
    assert "not judged" in decision.reason


def test_a_live_client_without_a_ready_endpoint_forces_the_change() -> None:
    clock = FakeClock()
    hysteresis = Hysteresis(min_gain=10.0, min_dwell_s=3600, clock=clock)
    hysteresis.commit(A)

    decision = hysteresis.decide(B, {}, ready=["c-01", *B])

    assert decision.clients == B
    assert "no ready endpoint for live client(s) c-00" in decision.reason


def test_a_new_number_of_slots_forces_the_change() -> None:
    hysteresis = Hysteresis(min_dwell_s=3600)
    hysteresis.commit(A)

    assert hysteresis.decide(("c-04",), {}, ready=CLIENTS).clients == ("c-04",)


def test_weights_move_only_by_the_minimum_change() -> None:
    clock = FakeClock()
    hysteresis = Hysteresis(min_weight_change=5, clock=clock)
    hysteresis.commit(A, {"c-00": 50, "c-01": 50})

    small = hysteresis.decide(A, {}, ready=CLIENTS, weights={"c-00": 53, "c-01": 47})
    large = hysteresis.decide(A, {}, ready=CLIENTS, weights={"c-00": 60, "c-01": 40})

    assert (dict(small.weights), small.held) == ({"c-00": 50, "c-01": 50}, True)
    assert (dict(large.weights), large.held) == ({"c-00": 60, "c-01": 40}, False)


@pytest.mark.parametrize(
    "settings",
    [{"min_gain": -0.1}, {"min_dwell_s": math.nan}, {"min_weight_change": -1}],
    ids=["negative-gain", "nan-dwell", "negative-weight-change"],
)
def test_bad_settings_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        Hysteresis(**settings)
