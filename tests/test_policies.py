"""Selection policies: what each one chooses, given what it is told."""

from __future__ import annotations

import random

import pytest

from meshctl import policies
from meshctl.policies.base import SelectionInput
from meshctl.policies.meshaware import MeshPolicy, MeshSettings
from meshctl.types import ClientFeedback, ClientState, ClientTelemetry, SlotOutcome

CLIENTS = [f"c-{i:02d}" for i in range(10)]


def _observed(
    client: str, p95_ms: float, errors: float = 0.0, ejections: int | None = None
) -> ClientTelemetry:
    state = ClientState.FAILING if errors >= 0.5 else ClientState.OBSERVED
    return ClientTelemetry(
        client=client,
        state=state,
        requests=10,
        requests_per_s=1.0,
        error_ratio=errors,
        latency_p50_ms=p95_ms / 2,
        latency_p95_ms=p95_ms,
        ejections=ejections,
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
    with pytest.raises(policies.UnknownPolicy, match="mesh, oort, power-of-choice"):
        policies.create("oracle")


def test_mesh_prefers_fast_reliable_clients_over_slow_and_failing_ones() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS}
    telemetry["c-01"] = _observed("c-01", 8000.0)  # slow
    telemetry["c-02"] = _observed("c-02", 1000.0, errors=0.6)  # failing
    policy = MeshPolicy(MeshSettings(exploration=0.0))
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
    policy = MeshPolicy(MeshSettings(exploration=0.25))
    given = SelectionInput(
        server_round=2, candidates=CLIENTS, per_round=4, telemetry=telemetry
    )

    selection = policy.select(given, random.Random(0))

    explored = [c for c in selection.clients if c in CLIENTS[5:]]
    assert len(explored) == 1
    assert selection.reasons[explored[0]].startswith("explore")


def test_a_window_without_traffic_changes_no_estimate() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0))
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
    policy = MeshPolicy(MeshSettings(exploration=0.0))
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


def _feedback(
    client: str, *, examples: int, loss: float, server_round: int = 1, status="ok"
) -> ClientFeedback:
    outcome = SlotOutcome(
        server_round=server_round,
        slot=1,
        status=status,
        duration_s=1.0,
        num_examples=examples,
        train_loss=loss,
    )
    return ClientFeedback(client=client, outcome=outcome)


def _round(policy, server_round, telemetry, per_round=1, candidates=None, seed=0):
    given = SelectionInput(
        server_round=server_round,
        candidates=candidates or sorted(telemetry),
        per_round=per_round,
        telemetry=telemetry,
    )
    return policy.select(given, random.Random(seed))


def test_mesh_scores_the_forecast_so_a_rising_latency_costs_before_it_averages():
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))
    first = {"x": _observed("x", 100.0), "y": _observed("y", 150.0)}
    first["z"] = _observed("z", 100.0)
    _round(policy, 1, first)

    rising = dict(first, z=_observed("z", 200.0))
    selection = _round(policy, 2, rising)

    # Holt, level 0.5, trend 0.3: z's level 0.5 * 200 + 0.5 * 100 = 150, trend
    # 0.3 * (150 - 100) = 15, forecast 165.  Preferred: median(100, 150, 165).
    assert selection.scores["z"] == pytest.approx((150 / 165) ** 2)
    assert selection.scores["y"] == pytest.approx(1.0)


def test_mesh_rests_a_client_the_mesh_ejected() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b")}
    telemetry["a"] = _observed("a", 50.0, ejections=1)

    chosen = [_round(policy, r, telemetry).clients for r in (1, 2)]

    # a is the faster, but Envoy ejected it: it rests for two rounds.
    assert chosen == [("b",), ("b",)]


def test_mesh_rests_a_client_whose_rounds_failed_on_the_server() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0))
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b")}
    history = {"a": [_feedback("a", examples=0, loss=0.0, status="timeout")]}
    given = SelectionInput(
        server_round=2,
        candidates=["a", "b"],
        per_round=1,
        telemetry=telemetry,
        history=history,
    )

    selection = policy.select(given, random.Random(0))

    # The mesh saw no error, but the server's failure ratio is 1: reliability 0.
    assert selection.clients == ("b",)
    assert selection.scores["a"] == 0.0


def test_mesh_gives_a_client_idle_too_long_a_probe_slot() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, max_idle_rounds=2))
    telemetry = {"a": _observed("a", 100.0), "b": _observed("b", 100.0)}
    telemetry["slow"] = _observed("slow", 900.0)

    rounds = [_round(policy, r, telemetry, per_round=2) for r in (1, 2, 3)]

    assert all("slow" not in s.clients for s in rounds[:2])
    assert "slow" in rounds[2].clients
    assert rounds[2].reasons["slow"] == "fairness: idle for 3 rounds"


def test_mesh_keeps_last_rounds_client_on_a_tie() -> None:
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b", "c")}
    for seed in range(20):
        policy = MeshPolicy(MeshSettings(exploration=0.0))
        first = _round(policy, 1, telemetry, seed=seed).clients
        again = _round(policy, 2, telemetry, seed=seed + 100)
        assert again.clients == first
        assert again.scores[first[0]] == pytest.approx(1.15)


def test_mesh_rests_a_client_over_its_share_of_recent_rounds() -> None:
    settings = MeshSettings(
        exploration=0.0, hysteresis=0.0, max_share=0.5, share_window_rounds=2
    )
    policy = MeshPolicy(settings)
    telemetry = {"fast": _observed("fast", 100.0), "slow": _observed("slow", 400.0)}

    chosen = [_round(policy, r, telemetry).clients[0] for r in (1, 2, 3, 4)]

    # fast took part in 1 of the last 2 rounds (share 0.5) and may go again;
    # after 2 of 2 it rests for a round.
    assert chosen == ["fast", "fast", "slow", "fast"]


def test_mesh_counts_a_timeout_as_slow_without_being_told_the_deadline() -> None:
    policy = MeshPolicy()
    late = SlotOutcome(
        server_round=1, slot=1, status="timeout", duration_s=7.2, reason="deadline"
    )
    fast = {c: _observed(c, 1000.0) for c in CLIENTS if c != "c-05"}
    given = SelectionInput(
        server_round=2,
        candidates=CLIENTS,
        per_round=3,
        telemetry=fast,
        history={"c-05": [ClientFeedback(client="c-05", outcome=late)]},
    )

    selection = policy.select(given, random.Random(0))

    # Measured (no more exploration) and slow: 7200 ms against a median of 1000.
    assert "c-05" not in selection.clients
    assert selection.scores["c-05"] < 0.05


def test_mesh_tries_an_unmeasured_client_before_one_that_just_failed() -> None:
    policy = MeshPolicy()
    failed = SlotOutcome(
        server_round=1, slot=1, status="error", duration_s=0.5, reason="HTTP 500"
    )
    healthy = SlotOutcome(
        server_round=1,
        slot=2,
        status="ok",
        duration_s=1.0,
        num_examples=100,
        train_loss=0.1,
    )
    given = SelectionInput(
        server_round=2,
        candidates=CLIENTS,
        per_round=3,
        history={
            "c-00": [ClientFeedback(client="c-00", outcome=failed)],
            "c-01": [ClientFeedback(client="c-01", outcome=healthy)],
        },
    )

    selection = policy.select(given, random.Random(0))

    assert "c-00" not in selection.clients
    assert "c-01" in selection.clients
