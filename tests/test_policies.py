"""Selection policies: what each one chooses, given what it is told."""

from __future__ import annotations

import random

import pytest

from meshctl import policies
from meshctl.policies.base import SelectionInput
from meshctl.policies.meshaware import MeshPolicy
from meshctl.types import ClientFeedback, ClientState, ClientTelemetry, SlotOutcome

CLIENTS = [f"c-{i:02d}" for i in range(10)]


def _observed(client: str, p95_ms: float, errors: float = 0.0) -> ClientTelemetry:
    state = ClientState.FAILING if errors >= 0.5 else ClientState.OBSERVED
    return ClientTelemetry(
        client=client,
        state=state,
        requests=10,
        requests_per_s=1.0,
        error_ratio=errors,
        latency_p50_ms=p95_ms / 2,
        latency_p95_ms=p95_ms,
    )


def test_random_chooses_k_distinct_ready_clients() -> None:
    policy = policies.create("random")
    given = SelectionInput(server_round=1, candidates=CLIENTS[:6], per_round=4)

    chosen = policy.select(given, random.Random(0)).clients

    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert set(chosen) <= set(CLIENTS[:6])


def test_random_is_reproducible_with_a_seed() -> None:
    given = SelectionInput(server_round=1, candidates=CLIENTS, per_round=3)
    first = policies.create("random").select(given, random.Random(7)).clients
    again = policies.create("random").select(given, random.Random(7)).clients
    assert first == again


def test_an_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(policies.UnknownPolicy, match="mesh, random"):
        policies.create("oracle")


def test_mesh_prefers_fast_reliable_clients_over_slow_and_failing_ones() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS}
    telemetry["c-01"] = _observed("c-01", 8000.0)  # slow
    telemetry["c-02"] = _observed("c-02", 1000.0, errors=0.6)  # failing
    policy = MeshPolicy(exploration=0.0)
    given = SelectionInput(
        server_round=2, candidates=CLIENTS, per_round=8, telemetry=telemetry
    )

    selection = policy.select(given, random.Random(0))

    assert "c-01" not in selection.clients
    assert "c-02" not in selection.clients
    # Worked by hand: speed (1000/8000)^2 = 1/64; reliability (1-0.6)^2 = 0.16.
    assert selection.scores["c-01"] == pytest.approx(1 / 64)
    assert selection.scores["c-02"] == pytest.approx(0.16)
    assert selection.scores["c-00"] == pytest.approx(1.0)


def test_mesh_explores_clients_it_never_measured() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS[:5]}
    policy = MeshPolicy(exploration=0.25)
    given = SelectionInput(
        server_round=2, candidates=CLIENTS, per_round=4, telemetry=telemetry
    )

    selection = policy.select(given, random.Random(0))

    explored = [c for c in selection.clients if c in CLIENTS[5:]]
    assert len(explored) == 1
    assert selection.reasons[explored[0]].startswith("explore")


def test_a_window_without_traffic_changes_no_estimate() -> None:
    policy = MeshPolicy(exploration=0.0)
    slow = {c: _observed(c, 1000.0) for c in CLIENTS}
    slow["c-03"] = _observed("c-03", 9000.0)
    policy.select(
        SelectionInput(server_round=1, candidates=CLIENTS, per_round=3, telemetry=slow),
        random.Random(0),
    )
    unobserved = {
        c: ClientTelemetry(client=c, state=ClientState.UNOBSERVED) for c in CLIENTS
    }

    selection = policy.select(
        SelectionInput(
            server_round=2, candidates=CLIENTS, per_round=3, telemetry=unobserved
        ),
        random.Random(0),
    )

    # Still slow: no data is not zero, and the old estimate stands.
    assert selection.scores["c-03"] == pytest.approx((1000 / 9000) ** 2)


def test_mesh_weighs_statistical_utility_from_feedback() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS[:2]}
    history = {
        "c-00": [_feedback("c-00", examples=100, loss=0.2)],
        "c-01": [_feedback("c-01", examples=100, loss=0.1)],
    }
    policy = MeshPolicy(exploration=0.0)
    given = SelectionInput(
        server_round=2,
        candidates=CLIENTS[:2],
        per_round=1,
        telemetry=telemetry,
        history=history,
    )

    selection = policy.select(given, random.Random(0))

    assert selection.clients == ("c-00",)
    assert selection.scores["c-01"] == pytest.approx(0.5)


def _feedback(client: str, *, examples: int, loss: float) -> ClientFeedback:
    outcome = SlotOutcome(
        server_round=1,
        slot=1,
        status="ok",
        duration_s=1.0,
        num_examples=examples,
        train_loss=loss,
    )
    return ClientFeedback(client=client, outcome=outcome)
